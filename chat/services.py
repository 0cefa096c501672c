"""Writes of sessions and messages, and the requests that start runs: a user's message,
a regenerated answer, an agent asked by another agent's run. The runs' and messages'
status transitions themselves are chat.state's; dispatching is chat.dispatch's."""

from __future__ import annotations

import uuid

from django.db import transaction
from django.http import Http404

from agents.models import Agent, AgentVersion
from agents.selectors import agent_lock_for_write
from common.exceptions import Conflict
from common.services import on_commit_robust
from governance.usage import usage_admit
from projects.models import Project
from projects.services import project_lock_for_write
from workspaces.redis import scoped

from . import state, streams
from .dispatch import run_cancel, run_dispatch, runs_cancel
from .models import ChatSession, Message, Run
from .suspend import (
    AgentCallRefused,
    agent_call_start,
    caller_resume_after,
    run_decide,
)


@transaction.atomic
def session_create(
    *, project: Project, agent: Agent, title: str = "", agent_version: AgentVersion | None = None
) -> ChatSession:
    """A session with `agent`; with `agent_version` (one of the agent's), its answers
    keep to that version whatever the agent becomes."""
    if agent.project_id != project.id:
        raise ValueError("the agent belongs to another project")
    if agent_version is not None and agent_version.agent_id != agent.id:
        raise ValueError("the version belongs to another agent")
    project_lock_for_write(project_id=project.id)
    agent_lock_for_write(agent_id=agent.id)
    return ChatSession.objects.create(
        project=project, agent=agent, title=title, agent_version=agent_version
    )


@transaction.atomic
def session_delete(*, session: ChatSession) -> None:
    project = project_lock_for_write(project_id=session.project_id)
    user_id, project_id, session_id = project.owner_id, project.id, session.id
    if not ChatSession.objects.filter(id=session_id).delete()[0]:
        raise Http404("No such chat session.")  # deleted meanwhile
    # The session's event stream goes with it (teardown takes it only with the project).
    on_commit_robust(
        lambda: streams.stream_delete(redis=scoped(user_id, project_id), session_id=session_id),
        name=f"stream_delete(session={session_id})",
    )


# --- Chat: a message, its answer, cancelling ------------------------------------------


class SessionBusy(Conflict):
    default_detail = (
        "An answer of this session is in flight, and its agent takes no message meanwhile "
        "(busy_policy `reject`): wait for it, or cancel it."
    )
    default_code = "session_busy"


def message_send(
    *, session: ChatSession, content: str, lane: str = "interactive"
) -> tuple[Message, Message]:
    """A user's message, as its agent's `busy_policy` says when an answer of the session
    is in flight: `reject` raises SessionBusy (nothing written), `interrupt` cancels
    the answers in flight first, `enqueue` answers it after them (message_create).
    `lane`: the bus's lane of its run ("bulk" for a schedule's)."""
    if session.agent.busy_policy == Agent.BusyPolicy.INTERRUPT:
        runs_cancel(session=session)
    return message_create(
        session=session,
        content=content,
        reject_if_busy=session.agent.busy_policy == Agent.BusyPolicy.REJECT,
        lane=lane,
    )


def message_create(
    *, session: ChatSession, content: str, reject_if_busy: bool = False, lane: str = "interactive"
) -> tuple[Message, Message]:
    """Store a user's message, the (pending) assistant message that will answer it and
    the run that will produce it, in one transaction: the run is the outbox.

    The run is first admitted against the project's and its owner's quotas: past a
    limit this raises QuotaExceeded (a 429) and stores nothing, so no provider is
    called. After commit the messages are announced on the session's event stream and
    the run is put on the project's bus, unless an older run of the session is in
    flight: then it waits, and the end of that one dispatches it (chat.dispatch). Neither
    can fail the request any more: if Redis or the broker is down, the run stays queued
    and the recovery pass dispatches it once they are back. Returns (user message,
    assistant message).
    """
    # Governance hook: quota admission; the admission is released if nothing is stored.
    project = session.project
    with usage_admit(project_id=project.id, user_id=project.owner_id) as run_id:
        return _message_create(
            session=session,
            content=content,
            reject_if_busy=reject_if_busy,
            run_id=run_id,
            lane=lane,
        )


@transaction.atomic
def _message_create(
    *, session: ChatSession, content: str, reject_if_busy: bool, run_id: uuid.UUID, lane: str
) -> tuple[Message, Message]:
    project_lock_for_write(project_id=session.project_id)
    # Held to commit: concurrent messages of one session see each other's runs.
    if not ChatSession.objects.select_for_update().filter(id=session.id).exists():
        raise Http404("No such chat session.")  # deleted meanwhile
    busy, version_id = state.session_busy_and_version(session=session)
    if busy and reject_if_busy:
        raise SessionBusy()
    user_message, assistant_message, run = state.run_create(
        session=session,
        run_id=run_id,
        question=content,
        dispatched=not busy,
        lane=lane,
        version_id=version_id,
    )
    on_commit_robust(
        lambda: run_dispatch(
            run=run,
            announce=(user_message, assistant_message),
            start=not busy,
            dispatched_at_written=True,
        ),
        name=f"run_dispatch(run={run.id})",
    )
    return user_message, assistant_message


class NothingToRegenerate(Conflict):
    default_detail = (
        "The session's last message is not a finished answer (nothing was asked yet, or "
        "an answer is in flight)."
    )
    default_code = "nothing_to_regenerate"


def answer_regenerate(*, session: ChatSession) -> Message:
    """Answer the session's last question again: its last answer (finished) is kept as
    `superseded`, out of the conversation, and a new pending answer and its run take
    its place. Raises NothingToRegenerate when the last message is not a finished
    answer, and QuotaExceeded (nothing changed) past a quota, as a message would."""
    # Governance hook: quota admission, as for a message.
    project = session.project
    with usage_admit(project_id=project.id, user_id=project.owner_id) as run_id:
        return _answer_regenerate(session=session, run_id=run_id)


@transaction.atomic
def _answer_regenerate(*, session: ChatSession, run_id: uuid.UUID) -> Message:
    project_lock_for_write(project_id=session.project_id)
    if not ChatSession.objects.select_for_update().filter(id=session.id).exists():
        raise Http404("No such chat session.")
    last = Message.objects.filter(session=session).order_by("-id").first()
    if (
        last is None
        or last.role != Message.Role.ASSISTANT
        or last.status not in Message.FINISHED
        or state.runs_active(session_id=session.id).exists()
    ):
        raise NothingToRegenerate()
    state.answer_supersede(message=last)
    _question, answer, run = state.run_create(session=session, run_id=run_id)
    on_commit_robust(
        lambda: run_dispatch(run=run, announce=(answer,)),
        name=f"run_dispatch(run={run.id})",
    )
    return answer


def session_run_cancel(*, run: Run) -> bool:
    """Stop one answer in flight (a waiting one too); True when this call stopped it (it
    ends `cancelled`). A caller waiting for it goes on, told it was cancelled."""
    cancelled = run_cancel(run=run)
    caller_resume_after(child_run_id=run.id)
    return cancelled


def session_runs_cancel(*, session: ChatSession) -> list[int]:
    """Stop the session's answers in flight; returns the ids of the assistant messages
    whose runs this call stopped (they end `cancelled`)."""
    stopped = runs_cancel(session=session)
    for run_id in Run.objects.filter(message_id__in=stopped).values_list("id", flat=True):
        caller_resume_after(child_run_id=run_id)
    return stopped


# --- Agent-to-agent calls (chat.calls, chat.toolloop): started in chat.suspend ------------

__all__ = ["AgentCallRefused", "agent_call_start"]


# --- Approval of tool calls (a waiting run: chat.suspend) -----------------------------------


def run_approve(
    *, run: Run, call_id: str | None = None, arguments: dict | None = None, by: str = "api"
) -> Run:
    """Approve the calls `run` waits for (`arguments`: one call's, edited, checked against
    its tool's schema); it resumes from that step on any worker. Raises ApprovalRefused
    (nothing written) when it does not wait for an approval or the input does not fit."""
    return run_decide(run=run, approved=True, call_id=call_id, arguments=arguments, by=by)


def run_reject(*, run: Run, reason: str, by: str = "api") -> Run:
    """Reject the calls `run` waits for: the model is told `reason` as their result, and
    the run goes on from that step on any worker. Raises ApprovalRefused as run_approve."""
    return run_decide(run=run, approved=False, reason=reason, by=by)
