"""Runs that wait holding no worker: stored, and resumed on any worker.

A run waits in two cases, both at a step of its tool loop (chat.toolloop):

- a call the model asked for needs its owner's approval (the tool's `requires_approval`
  or its kind in TOOL_APPROVAL_KINDS): the run waits until the owner approves (with the
  arguments as they are, or edited), rejects (with a reason; the model is told), or
  RUN_APPROVAL_TIMEOUT_SECONDS pass (the run ends in error);
- it asked other agents (AGENT_CALLS_SUSPEND): each callee runs as a child run, and
  the caller waits until every child ended; then it is resumed with their answers.

Waiting is status `waiting` with the run's state in `Run.suspended`:

    reason      "approval" | "agents" | "handed-back"
    step        the tool loop's step that asked for the calls
    messages    the conversation as sent to the model at that step
    said        what the model said in that step before its calls
    content     the answer's text so far (every step)
    calls       [{id, name, arguments, parameters, kind, requires_approval}]
    approval    the ids of the calls that wait for approval
    decision    once decided: {approved, reason, arguments: {call id: JSON text}}
    results     {call id: {ok, content, extra}}: the calls that already ran
    children    {call id: child run id}: the agents asked

Resuming is waiting -> queued as a new attempt (chat.state.run_resume), then the usual
dispatch onto the project's bus: the worker that takes it finishes the step from the
stored state (chat.engine) and goes on. Nothing holds a thread, a slot or a lease
meanwhile, so the recovery pass leaves a waiting run alone but for its deadline, and for
a caller whose children all ended while its resume was lost (`runs_waiting_recover`).

The same state, reason "handed-back", is kept with a run its worker gave back (shutting
down, or Redis away: chat.engine) after a step whose calls were made: queued again, it
goes on from the step after them, their results known, so a call that may not be
repeated is neither made twice nor a reason to give up.
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Exists, OuterRef
from django.http import Http404
from django.utils import timezone
from jsonschema import Draft202012Validator

from agents.models import Agent
from common.budget import Budget
from common.services import on_commit_robust
from governance.quotas import QuotaUnavailable
from governance.usage import QuotaExceeded, usage_admit
from projects.services import project_lock_for_write

from . import state, streams
from .dispatch import run_children_cancel, run_dispatch, run_next_dispatch
from .models import ChatSession, Message, Run

logger = logging.getLogger(__name__)

APPROVAL = "approval"
AGENTS = "agents"
HANDED_BACK = "handed-back"


# --- Agent-to-agent calls: starting the callee ------------------------------------------


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
    question, answer, run = state.run_create(
        session=session, run_id=run_id, question=content, agent=target, parent=parent
    )
    on_commit_robust(
        lambda: run_dispatch(run=run, announce=(question, answer)),
        name=f"run_dispatch(run={run.id})",
    )
    return run


def child_outcome(child: Run) -> dict[str, Any]:
    """What a finished child run tells its caller's model (as chat.calls did)."""
    links = {"child_run_id": str(child.id), "child_session_id": str(child.session_id)}
    message = Message.objects.filter(id=child.message_id).values("content", "error").first()
    message = message or {"content": "", "error": child.error}
    if child.status == Run.Status.DONE:
        return {"ok": True, "content": message["content"], "extra": links}
    if child.status == Run.Status.ERROR:
        error = message["error"] or child.error
        content = f"error: the agent's answer failed: {error}"
        return {"ok": False, "content": content, "extra": links}
    return {"ok": False, "content": "error: the agent's run was cancelled", "extra": links}


# --- Resuming ----------------------------------------------------------------------------


def run_resume_dispatch(run: Run, *, why: str) -> None:
    """Put a resumed run on its project's bus (any worker takes it); if that fails, it
    is queued and undispatched: the recovery pass dispatches it."""
    state.run_event_append(run=run, event_type=streams.RUN_RESUMED, data={"why": why})
    try:
        run_dispatch(run=run)
    except Exception:
        logger.warning("run %s resumed; its dispatch waits for the recovery pass", run.id)


def caller_resume_if_answered(*, run_id: uuid.UUID | str) -> bool:
    """Resume the waiting caller `run_id` if every agent it asked has ended (their
    answers stored as the calls' results). Idempotent and safe to call from anywhere:
    a child's end, the caller's own suspension (a child may end before its caller is
    stored), the recovery pass. True when this call resumed it."""

    def answered(run: Run, suspended: dict[str, Any]) -> bool:
        if suspended.get("reason") != AGENTS:
            return False
        children = suspended.get("children") or {}
        ended = {
            str(child.id): child
            for child in Run.objects.filter(id__in=list(children.values()))
            if child.status in Run.FINISHED
        }
        # A child row gone (deleted with its session) ended too: as cancelled.
        gone = set(children.values()) - {
            str(i)
            for i in Run.objects.filter(id__in=list(children.values())).values_list("id", flat=True)
        }
        if any(child_id not in ended and child_id not in gone for child_id in children.values()):
            return False
        results = dict(suspended.get("results") or {})
        for call_id, child_id in children.items():
            if child_id in ended:
                results[call_id] = child_outcome(ended[child_id])
            else:
                results[call_id] = {"ok": False, "content": "error: the agent's run is gone"}
        suspended["results"] = results
        return True

    resumed = state.run_resume(run_id=run_id, change=answered)
    if resumed is None:
        return False
    run_resume_dispatch(resumed, why="answered")
    return True


def caller_resume_after(
    *, child_run_id: uuid.UUID | str, parent_id: uuid.UUID | None | object = state.NOT_READ
) -> None:
    """After a run ended: its caller, if it waits for it, may go on. `parent_id`: the
    ended run's caller (None: it has none), when read already. Never raises."""
    try:
        if parent_id is state.NOT_READ:
            parent_id = (
                Run.objects.filter(id=child_run_id, status__in=Run.FINISHED)
                .values_list("parent_id", flat=True)
                .first()
            )
        if parent_id is not None:
            caller_resume_if_answered(run_id=parent_id)
    except Exception:
        logger.warning("run %s: its caller was not resumed; recovery will", child_run_id)


# --- Approval -----------------------------------------------------------------------------


class ApprovalRefused(Exception):
    """A decision that does not fit the waiting run: str() says why; `field` names the
    input at fault ("" for the run's state: a 409)."""

    def __init__(self, message: str, *, field: str = "") -> None:
        super().__init__(message)
        self.field = field


def approval_calls(run: Run) -> list[dict[str, Any]]:
    """The calls a run waits to have approved (none unless it waits for approval)."""
    suspended = run.suspended or {}
    if run.status != Run.Status.WAITING or suspended.get("reason") != APPROVAL:
        return []
    waiting = set(suspended.get("approval") or ())
    return [call for call in suspended.get("calls") or () if call["id"] in waiting]


def approval_arguments_check(
    run: Run, *, call_id: str | None, arguments: dict[str, Any] | None
) -> str | None:
    """The call an edit of `arguments` applies to (None: no edit), after checking the
    edit against the tool's JSON schema; raises ApprovalRefused."""
    calls = approval_calls(run)
    if not calls:
        raise ApprovalRefused("The run does not wait for an approval.")
    if call_id is not None and call_id not in {call["id"] for call in calls}:
        raise ApprovalRefused("The run waits for no such call.", field="call_id")
    if arguments is None:
        return None
    if call_id is None:
        if len(calls) > 1:
            raise ApprovalRefused(
                "The run waits for several calls: say which one the arguments are for.",
                field="call_id",
            )
        call_id = calls[0]["id"]
    schema = next(call for call in calls if call["id"] == call_id).get("parameters") or {}
    if schema:
        try:
            error = next(iter(Draft202012Validator(schema).iter_errors(arguments)), None)
        except RecursionError:
            error = None  # as the tool itself: such a schema cannot be checked
        if error is not None:
            where = "/".join(str(p) for p in error.path)
            raise ApprovalRefused(
                f"Not valid for the tool: {where + ': ' if where else ''}{error.message}",
                field="arguments",
            )
    return call_id


def run_decide(
    *,
    run: Run,
    approved: bool,
    reason: str = "",
    call_id: str | None = None,
    arguments: dict[str, Any] | None = None,
    by: str = "api",
) -> Run:
    """Approve (optionally with one call's arguments edited) or reject the calls a run
    waits for; it is resumed from that step on any worker. Raises ApprovalRefused when it
    does not wait for an approval (any more: decided, cancelled, timed out) or the input
    does not fit; nothing is written then."""
    edited = approval_arguments_check(run, call_id=call_id, arguments=arguments)
    decision = {
        "approved": approved,
        "reason": reason,
        "arguments": {edited: json.dumps(arguments)} if edited else {},
        "by": by,
        "at": timezone.now().isoformat(),
    }

    def decide(locked: Run, suspended: dict[str, Any]) -> bool:
        if suspended.get("reason") != APPROVAL or suspended.get("decision"):
            return False
        suspended["decision"] = decision
        return True

    resumed = state.run_resume(run_id=run.id, change=decide)
    if resumed is None:
        raise ApprovalRefused("The run does not wait for an approval any more.")
    run_resume_dispatch(resumed, why="approved" if approved else "rejected")
    return resumed


# --- The recovery pass's part -------------------------------------------------------------


def runs_waiting_recover(*, limit: int = 500, budget: float | None = None) -> dict[str, int]:
    """End the waiting runs past their deadline (an approval not given in time), cancel
    the agents a caller waited for too long (it goes on, told), and resume the callers
    whose agents all ended while their resume was lost.

    Within `budget` seconds (by default RUN_RECOVERY_SECONDS; common.budget): past it,
    it stops between runs, at least one done, and the next pass goes on (`unfinished`)."""
    done = {"waits_expired": 0, "waits_resumed": 0}
    clock = Budget(settings.RUN_RECOVERY_SECONDS if budget is None else budget)
    handled = 0

    def in_time() -> bool:
        nonlocal handled
        handled += 1
        if handled > 1 and clock.over():
            done["unfinished"] = 1
            return False
        return True

    now = timezone.now()
    late = list(
        Run.objects.filter(status=Run.Status.WAITING, waiting_until__lt=now)
        .select_related("session__project")
        .order_by("waiting_until")[:limit]
    )
    for run in late:
        if not in_time():
            return done
        if (run.suspended or {}).get("reason") == AGENTS:
            # As a call that timed out: the callees still at work are cancelled and the
            # caller goes on, its model told (the calls' results say they were cancelled).
            run_children_cancel(run=run)
            if caller_resume_if_answered(run_id=run.id):
                done["waits_expired"] += 1
            continue
        error = f"the tool call was not approved within {settings.RUN_APPROVAL_TIMEOUT_SECONDS:g}s"
        if state.run_end(
            run=run,
            status=Run.Status.ERROR,
            content=None,
            error=error,
            from_statuses=(Run.Status.WAITING,),
            attempt=run.attempt,
        ):
            done["waits_expired"] += 1
            run_next_dispatch(session_id=run.session_id)
    # Only those none of whose children is still active: the others wait for them.
    callers = (
        Run.objects.filter(status=Run.Status.WAITING, suspended__reason=AGENTS)
        .exclude(Exists(state.runs_active().filter(parent=OuterRef("pk"))))
        .values_list("id", flat=True)[:limit]
    )
    for run_id in list(callers):
        if not in_time():
            return done
        if caller_resume_if_answered(run_id=run_id):
            done["waits_resumed"] += 1
    return done
