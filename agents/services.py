"""Writes of agents, sessions and messages, and the requests that put agent work on the
project's bus (chat runs, context jobs and searches)."""

from __future__ import annotations

import time
import uuid
from typing import Any

from celery import Task
from django.conf import settings
from django.db import transaction
from django.http import Http404
from rest_framework.exceptions import Throttled

from agentbus import publish
from common.exceptions import Conflict
from common.redis import get_redis
from common.services import model_update, on_commit_robust
from governance.quotas import QuotaUnavailable
from governance.usage import QuotaExceeded, usage_admit
from projects.models import Project
from projects.services import project_lock_for_write
from workspaces.redis import scoped
from workspaces.services import workspace_agent_sync_on_commit

from .models import Agent, ChatSession, Message, ProjectSecret, Run, Tool
from .runs import run_cancel, run_dispatch, runs_cancel
from .runtime import streams
from .tasks import add_context, clear_context, drop_collection, search_context

AGENT_FIELDS = ("name", "system_prompt", "model", "params", "busy_policy")


@transaction.atomic
def agent_create(
    *,
    project: Project,
    name: str,
    system_prompt: str = "",
    model: str = "",
    params: dict[str, Any] | None = None,
    busy_policy: str = Agent.BusyPolicy.ENQUEUE,
) -> Agent:
    project_lock_for_write(project_id=project.id)
    agent = Agent.objects.create(
        project=project,
        name=name,
        system_prompt=system_prompt,
        model=model,
        params=params or {},
        busy_policy=busy_policy,
    )
    # The workspace's AgentCache follows the committed row.
    workspace_agent_sync_on_commit(project_id=project.id, agent_id=agent.id)
    return agent


@transaction.atomic
def agent_update(*, agent: Agent, data: dict[str, Any]) -> Agent:
    project_lock_for_write(project_id=agent.project_id)
    if not Agent.objects.filter(id=agent.id).exists():
        raise Http404("No such agent.")  # deleted meanwhile
    agent, changed = model_update(instance=agent, fields=AGENT_FIELDS, data=data)
    if changed:
        workspace_agent_sync_on_commit(project_id=agent.project_id, agent_id=agent.id)
    return agent


@transaction.atomic
def agent_delete(*, agent: Agent) -> None:
    project = project_lock_for_write(project_id=agent.project_id)
    agent_id = agent.id
    if not Agent.objects.filter(id=agent_id).delete()[0]:
        raise Http404("No such agent.")  # deleted meanwhile
    workspace_agent_sync_on_commit(project_id=project.id, agent_id=agent_id)
    # Its context goes too; if this is lost, the collections sweep finds the stray.
    on_commit_robust(
        lambda: publish(
            drop_collection,
            project_id=project.id,
            kwargs={"user_id": project.owner_id, "agent_id": str(agent_id)},
        ),
        name=f"drop_collection(agent={agent_id})",
    )


@transaction.atomic
def session_create(*, project: Project, agent: Agent, title: str = "") -> ChatSession:
    if agent.project_id != project.id:
        raise ValueError("the agent belongs to another project")
    project_lock_for_write(project_id=project.id)
    if not Agent.objects.filter(id=agent.id).exists():
        raise Http404("No such agent.")  # deleted meanwhile
    return ChatSession.objects.create(project=project, agent=agent, title=title)


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


def _active_runs(session: ChatSession):
    return Run.objects.filter(session=session, status__in=(Run.Status.QUEUED, Run.Status.RUNNING))


def message_send(*, session: ChatSession, content: str) -> tuple[Message, Message]:
    """A user's message, as its agent's `busy_policy` says when an answer of the session
    is in flight: `reject` raises SessionBusy (nothing written), `interrupt` cancels
    the answers in flight first, `enqueue` answers it after them (message_create)."""
    if session.agent.busy_policy == Agent.BusyPolicy.INTERRUPT:
        runs_cancel(session=session)
    return message_create(
        session=session,
        content=content,
        reject_if_busy=session.agent.busy_policy == Agent.BusyPolicy.REJECT,
    )


def message_create(
    *, session: ChatSession, content: str, reject_if_busy: bool = False
) -> tuple[Message, Message]:
    """Store a user's message, the (pending) assistant message that will answer it and
    the run that will produce it, in one transaction: the run is the outbox.

    The run is first admitted against the project's and its owner's quotas: past a
    limit this raises QuotaExceeded (a 429) and stores nothing, so no provider is
    called. After commit the messages are announced on the session's event stream and
    the run is put on the project's bus, unless an older run of the session is in
    flight: then it waits, and the end of that one dispatches it (agents.runs). Neither
    can fail the request any more: if Redis or the broker is down, the run stays queued
    and the recovery pass dispatches it once they are back. Returns (user message,
    assistant message).
    """
    # Governance hook: quota admission; the admission is released if nothing is stored.
    project = session.project
    with usage_admit(project_id=project.id, user_id=project.owner_id) as run_id:
        return _message_create(
            session=session, content=content, reject_if_busy=reject_if_busy, run_id=run_id
        )


@transaction.atomic
def _message_create(
    *, session: ChatSession, content: str, reject_if_busy: bool, run_id: uuid.UUID
) -> tuple[Message, Message]:
    project_lock_for_write(project_id=session.project_id)
    # Held to commit: concurrent messages of one session see each other's runs.
    if not ChatSession.objects.select_for_update().filter(id=session.id).exists():
        raise Http404("No such chat session.")  # deleted meanwhile
    busy = _active_runs(session).exists()
    if busy and reject_if_busy:
        raise SessionBusy()
    user_message = Message.objects.create(
        session=session, role=Message.Role.USER, content=content, status=Message.Status.DONE
    )
    assistant_message = Message.objects.create(
        session=session, role=Message.Role.ASSISTANT, status=Message.Status.PENDING
    )
    run = Run.objects.create(
        id=run_id, session=session, message=assistant_message, agent_id=session.agent_id
    )
    on_commit_robust(
        lambda: run_dispatch(run=run, announce=(user_message, assistant_message), start=not busy),
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
        or _active_runs(session).exists()
    ):
        raise NothingToRegenerate()
    last.status = Message.Status.SUPERSEDED
    last.save(update_fields=["status"])
    answer = Message.objects.create(
        session=session, role=Message.Role.ASSISTANT, status=Message.Status.PENDING
    )
    run = Run.objects.create(id=run_id, session=session, message=answer, agent_id=session.agent_id)
    on_commit_robust(
        lambda: run_dispatch(run=run, announce=(answer,)),
        name=f"run_dispatch(run={run.id})",
    )
    return answer


def session_run_cancel(*, run: Run) -> bool:
    """Stop one answer in flight; True when this call stopped it (it ends `cancelled`)."""
    return run_cancel(run=run)


def session_runs_cancel(*, session: ChatSession) -> list[int]:
    """Stop the session's answers in flight; returns the ids of the assistant messages
    whose runs this call stopped (they end `cancelled`)."""
    return runs_cancel(session=session)


# --- Agent-to-agent calls (agents.tools.calls) ------------------------------------------


class AgentCallRefused(Exception):
    """An agent call that may not start; str() says why (told to the calling model)."""


def agent_call_start(*, parent_run_id: uuid.UUID | str, target_agent_id: str, content: str) -> Run:
    """Start the answer of `target_agent_id` (an agent of the calling run's project) to
    `content`, in a session of its own, as a child run of `parent_run_id`: dispatched on
    the project's bus after commit. Raises AgentCallRefused past the depth or fan-out
    limits, for an agent of another project, or when the caller no longer runs."""
    parent = (
        Run.objects.filter(id=parent_run_id).select_related("session__project", "agent").first()
    )
    if parent is None:
        raise AgentCallRefused("the calling run no longer exists")
    project = parent.session.project
    try:
        # Governance hook: a call starts a run, admitted against the quotas as a message.
        with usage_admit(project_id=project.id, user_id=project.owner_id) as run_id:
            return _agent_call_start(
                parent=parent, target_agent_id=target_agent_id, content=content, run_id=run_id
            )
    except Http404:
        raise AgentCallRefused("the project no longer exists") from None
    except (QuotaExceeded, QuotaUnavailable) as exc:
        raise AgentCallRefused(f"refused: {exc.detail}") from None


@transaction.atomic
def _agent_call_start(*, parent: Run, target_agent_id: str, content: str, run_id: uuid.UUID) -> Run:
    project = project_lock_for_write(project_id=parent.session.project_id)
    # Held to commit: parallel calls of one run count each other's children.
    locked = Run.objects.select_for_update().filter(id=parent.id).first()
    if locked is None or locked.status != Run.Status.RUNNING:
        raise AgentCallRefused("the calling run is no longer running")
    target = Agent.objects.filter(id=target_agent_id, project_id=project.id).first()
    if target is None:
        raise AgentCallRefused("no such agent in this project")
    if parent.depth + 1 > settings.AGENT_CALL_MAX_DEPTH:
        raise AgentCallRefused(
            f"refused: calls between agents go at most {settings.AGENT_CALL_MAX_DEPTH} deep"
        )
    if Run.objects.filter(parent_id=parent.id).count() >= settings.AGENT_CALL_MAX_FANOUT:
        raise AgentCallRefused(
            f"refused: a run calls other agents at most {settings.AGENT_CALL_MAX_FANOUT} times"
        )
    session = ChatSession.objects.create(
        project=project, agent=target, title=f"{parent.agent.name} asks {target.name}"[:200]
    )
    question = Message.objects.create(
        session=session, role=Message.Role.USER, content=content, status=Message.Status.DONE
    )
    answer = Message.objects.create(
        session=session, role=Message.Role.ASSISTANT, status=Message.Status.PENDING
    )
    run = Run.objects.create(
        id=run_id,
        session=session,
        message=answer,
        agent=target,
        parent=parent,
        depth=parent.depth + 1,
    )
    on_commit_robust(
        lambda: run_dispatch(run=run, announce=(question, answer)),
        name=f"run_dispatch(run={run.id})",
    )
    return run


# --- Tools and the project's secrets (agents.tools) -------------------------------------

TOOL_FIELDS = (
    "kind",
    "name",
    "description",
    "parameters",
    "method",
    "url_template",
    "headers",
    "safe_to_repeat",
    "timeout_seconds",
    "target_agent",
)


@transaction.atomic
def tool_create(*, agent: Agent, data: dict[str, Any]) -> Tool:
    """Give the agent a tool (validated by the caller: agents.apis.tools.tool_check)."""
    project_lock_for_write(project_id=agent.project_id)
    if not Agent.objects.filter(id=agent.id).exists():
        raise Http404("No such agent.")  # deleted meanwhile
    fields = {k: v for k, v in data.items() if k in TOOL_FIELDS}
    if fields.get("timeout_seconds", "") is None:
        del fields["timeout_seconds"]
    # A GET changes nothing, by HTTP's rules: repeatable unless said otherwise.
    fields.setdefault("safe_to_repeat", fields.get("method") == Tool.Method.GET)
    return Tool.objects.create(agent=agent, **fields)


@transaction.atomic
def tool_update(*, tool: Tool, data: dict[str, Any]) -> Tool:
    project_lock_for_write(project_id=tool.agent.project_id)
    if not Tool.objects.filter(id=tool.id).exists():
        raise Http404("No such tool.")  # deleted meanwhile
    tool, _changed = model_update(instance=tool, fields=TOOL_FIELDS, data=data)
    return tool


@transaction.atomic
def tool_delete(*, tool: Tool) -> None:
    project_lock_for_write(project_id=tool.agent.project_id)
    if not Tool.objects.filter(id=tool.id).delete()[0]:
        raise Http404("No such tool.")


@transaction.atomic
def project_secret_set(
    *, project: Project, name: str, value: str, create: bool = False
) -> ProjectSecret:
    """Store (`create`) or replace a secret's value. The value is never logged."""
    project_lock_for_write(project_id=project.id)
    if create:
        return ProjectSecret.objects.create(project=project, name=name, value=value)
    secret = ProjectSecret.objects.select_for_update().filter(project=project, name=name).first()
    if secret is None:
        raise Http404("No such secret.")  # deleted meanwhile
    secret.value = value
    secret.save(update_fields=["value", "updated_at"])
    return secret


@transaction.atomic
def project_secret_delete(*, secret: ProjectSecret) -> None:
    project_lock_for_write(project_id=secret.project_id)
    if not ProjectSecret.objects.filter(id=secret.id).delete()[0]:
        raise Http404("No such secret.")


# --- The agent's context ----------------------------------------------------------------


def context_documents_add(*, agent: Agent, documents: list[dict[str, Any]]) -> str:
    """Queue documents ({"text", "metadata"?}) for the agent's context; returns the job id."""
    return _context_job_start(
        agent=agent,
        task=add_context,
        kind="add",
        fields={"documents": len(documents)},
        documents=documents,
    )


def context_clear(*, agent: Agent) -> str:
    """Queue forgetting everything in the agent's context; returns the job id."""
    return _context_job_start(agent=agent, task=clear_context, kind="clear")


def _context_job_start(
    *,
    agent: Agent,
    task: Task,
    kind: str,
    fields: dict | None = None,
    documents: list[dict[str, Any]] | None = None,
) -> str:
    """Record a context job (readable at .../context/jobs/{id}/) and put it on the bus.
    Both need Redis: while it is down this raises (a 503), having written nothing."""
    project = agent.project
    job_id = str(uuid.uuid4())
    streams.job_create(
        redis=scoped(project.owner_id, project.id),
        job_id=job_id,
        fields={
            "id": job_id,
            "kind": kind,
            "agent_id": str(agent.id),
            "status": "queued",
            "created_at": time.time(),
            **(fields or {}),
        },
        documents=documents,
    )
    publish(
        task,
        project_id=project.id,
        kwargs={"user_id": project.owner_id, "agent_id": str(agent.id), "job_id": job_id},
    )
    return job_id


class ContextUnavailable(Exception):
    """No worker answered a context search in time, or the store failed."""


class TooManySearches(Throttled):
    default_detail = "Too many context searches in flight for this user or project."


def search_limits() -> list[int]:
    return [
        settings.SEARCH_INFLIGHT_PER_USER,
        settings.SEARCH_INFLIGHT_PER_PROJECT,
        int(2 * settings.CONTEXT_SEARCH_TIMEOUT_SECONDS) + 5,
    ]


def context_search_task_kwargs(
    *, agent: Agent, request_id: str, query: str, k: int, timeout: float
) -> dict:
    project = agent.project
    return {
        "user_id": project.owner_id,
        "agent_id": str(agent.id),
        "request_id": request_id,
        "query": query,
        "k": k,
        # A worker reaching the task after this gives up: nobody is waiting any more.
        "deadline": time.time() + timeout,
    }


def context_search(*, agent: Agent, query: str, k: int, timeout: float) -> list[dict[str, Any]]:
    """Search the agent's context, waiting (at most `timeout` seconds) for a worker: the
    vector store lives on workers, so the search is a task on the project's bus.

    This is the blocking form, for a request served in a thread (WSGI, the test
    client); under ASGI `agents.waits` serves the same search without one. At most
    SEARCH_INFLIGHT_PER_USER / _PER_PROJECT wait at once (TooManySearches, a 429)."""
    project = agent.project
    redis = scoped(project.owner_id, project.id)
    counters = streams.inflight_keys(
        user_id=project.owner_id, project_prefix=redis.prefix, kind="search"
    )
    client = get_redis()
    if not client.register_script(streams.ADMIT)(keys=counters, args=search_limits()):
        raise TooManySearches(wait=1)
    request_id = str(uuid.uuid4())
    try:
        publish(
            search_context,
            project_id=project.id,
            kwargs=context_search_task_kwargs(
                agent=agent, request_id=request_id, query=query, k=k, timeout=timeout
            ),
        )
        answer = streams.reply_wait(redis=redis, request_id=request_id, timeout=timeout)
    finally:
        pipe = client.pipeline(transaction=False)
        for counter in counters:
            pipe.decr(counter)
        pipe.execute()
    return search_answer(answer, timeout=timeout)


def search_answer(answer: dict | None, *, timeout: float) -> list[dict[str, Any]]:
    if answer is None:
        raise ContextUnavailable(f"no worker answered within {timeout:g}s")
    if "error" in answer:
        raise ContextUnavailable(f"the context store failed: {answer['error']}")
    return answer["results"]
