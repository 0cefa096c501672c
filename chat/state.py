"""The one writer of a run's and its messages' status: every transition is here.

A run is accepted with its messages (`run_create`, the outbox), marked dispatched when
its task is on the bus (`run_dispatched`), claimed by one worker for one dispatch
generation (`run_claim`), kept under a lease its worker renews (`leases_renew`), ended
exactly once (`run_end`), or taken back to queued as a new generation for the recovery
pass to dispatch again (`run_take_back`). Every write a worker makes is conditional on
the run still being its own (status and `attempt`), so a worker that lost its run cannot
touch it any more. Everything else reads runs through `runs_active` and the selectors.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import uuid
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Exists, F, OuterRef, Q, QuerySet
from django.db.models.expressions import CombinedExpression
from django.db.models.functions import Now
from django.utils import timezone

from agents.models import Agent, AgentVersion
from agents.versions import agent_version_latest
from common.tracing import current_trace_id
from governance.usage import usage_charge, usage_record, usage_row_write, usage_run_ended
from workspaces.redis import ScopedRedis, scoped

from . import signals, streams
from .models import ChatSession, Message, Run

logger = logging.getLogger(__name__)

# Not ended: a waiting run (stored, holding no worker) still answers its session's
# message, counts once against the quotas in flight, and a newer message waits behind it.
ACTIVE = (Run.Status.QUEUED, Run.Status.RUNNING, Run.Status.WAITING)
WORKER_NAME = f"{socket.gethostname()}:{os.getpid()}"


def _storable(value: Any) -> Any:
    """`value` with the NUL characters taken out of its strings. A model, a tool or a
    file can produce one, and PostgreSQL's text and jsonb refuse it: the write, and the
    run with it, would fail on every attempt."""
    if isinstance(value, str):
        return value.replace("\x00", "")
    if isinstance(value, list):
        return [_storable(item) for item in value]
    if isinstance(value, dict):
        return {_storable(key): _storable(item) for key, item in value.items()}
    return value


# --- Reads every writer and reader agrees on ---------------------------------------------


def runs_active(*, session_id: uuid.UUID | str | None = None) -> QuerySet[Run]:
    """Runs not ended yet (queued, running or waiting), of one session when given."""
    runs = Run.objects.filter(status__in=ACTIVE)
    return runs if session_id is None else runs.filter(session_id=session_id)


def waits_behind_another() -> Exists:
    """For a Run queryset: the run has an older active run in its session."""
    return Exists(
        runs_active().filter(session=OuterRef("session"), created_at__lt=OuterRef("created_at"))
    )


def lease_deadline() -> CombinedExpression:
    """A lease's end, on the database's clock: the recovery pass compares it with that
    clock too (`lease_ended`), so a worker host whose own clock is off neither writes
    leases that ended before they began nor ones that last too long."""
    return Now() + timedelta(seconds=settings.RUN_LEASE_SECONDS)


def lease_ended() -> Q:
    """For a Run queryset: its lease ended, by the database's clock (`lease_deadline`)."""
    return Q(lease_expires_at__lt=Now())


# --- Create ---------------------------------------------------------------------------


NOT_READ = object()


def session_busy_and_version(*, session: ChatSession) -> tuple[bool, int | None]:
    """In one query: whether a run of the session has not ended (runs_active), and the
    version its next run answers with (the session's pin, else its agent's latest, as
    run_create reads it). Read under the session's lock: a message decides on both."""
    if session.agent_version_id is not None:
        return runs_active(session_id=session.id).exists(), session.agent_version_id
    runs, versions = Run._meta.db_table, AgentVersion._meta.db_table
    session_key = Run._meta.get_field("session").get_db_prep_value(session.id, connection)
    agent_key = AgentVersion._meta.get_field("agent").get_db_prep_value(
        session.agent_id, connection
    )
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT EXISTS (SELECT 1 FROM {runs} WHERE session_id = %s AND status IN "
            f"(%s, %s, %s)), (SELECT id FROM {versions} WHERE agent_id = %s "
            "ORDER BY number DESC LIMIT 1)",
            [session_key, *ACTIVE, agent_key],
        )
        busy, version_id = cursor.fetchone()
    return bool(busy), version_id


def run_create(
    *,
    session: ChatSession,
    run_id: uuid.UUID,
    question: str | None = None,
    agent: Agent | None = None,
    parent: Run | None = None,
    dispatched: bool = False,
    lane: str | None = None,
    version_id: int | None | object = NOT_READ,
) -> tuple[Message | None, Message, Run]:
    """Store (inside the caller's transaction) the user's `question` when given, the
    pending assistant message that will answer it and the run that will produce it.
    `dispatched`: the caller dispatches it right after commit (run_dispatch with
    `dispatched_at_written`), so its dispatch time is written now, not in a write of
    its own; one that fails leaves no mark, which the recovery pass sees as lost.
    `lane`: the bus's lane of its every attempt (default: its parent's, else interactive:
    an agent asked by a scheduled run answers on the bulk lane too).
    `version_id`: the version it answers with, when the caller read it already
    (session_busy_and_version). Returns (question message or None, assistant message, run)."""
    asked = None
    if question is not None:
        asked = Message(
            session=session, role=Message.Role.USER, content=question, status=Message.Status.DONE
        )
    answer = Message(session=session, role=Message.Role.ASSISTANT, status=Message.Status.PENDING)
    if asked is not None:
        # One INSERT for both (ids in this order: the question before its answer).
        Message.objects.bulk_create([asked, answer])
    else:
        answer.save(force_insert=True)
    agent_id = agent.id if agent is not None else session.agent_id
    # The version it answers with: the session's pin (for its own agent), else the latest.
    if version_id is not NOT_READ:
        pass  # read by the caller
    elif agent_id == session.agent_id and session.agent_version_id is not None:
        version_id = session.agent_version_id
    else:
        latest = agent_version_latest(agent_id=agent_id)
        version_id = latest.id if latest is not None else None
    run = Run.objects.create(
        id=run_id,
        session=session,
        message=answer,
        agent_id=agent_id,
        agent_version_id=version_id,
        parent=parent,
        depth=parent.depth + 1 if parent is not None else 0,
        trace_id=current_trace_id(),
        dispatched_at=timezone.now() if dispatched else None,
        lane=lane or (parent.lane if parent is not None else "interactive"),
    )
    return asked, answer, run


def runs_steps_forget(*, run_ids: list[uuid.UUID]) -> int:
    """Retention: the steps (tool calls and their results) of ended runs are dropped; the
    run, its status and timings stay. Only ended runs: a live run's steps are its state."""
    return Run.objects.filter(id__in=run_ids, status__in=Run.FINISHED).update(steps=[])


def answer_supersede(*, message: Message) -> None:
    """A finished answer replaced by a regenerated one: kept, out of the conversation."""
    Message.objects.filter(id=message.id).update(status=Message.Status.SUPERSEDED)
    message.status = Message.Status.SUPERSEDED


# --- Dispatched -----------------------------------------------------------------------


def run_dispatched(*, run: Run) -> None:
    """The run's current attempt is on the project's bus."""
    Run.objects.filter(id=run.id, attempt=run.attempt).update(dispatched_at=timezone.now())


def run_undispatched(*, run: Run, attempt: int) -> bool:
    """The run waits behind an older run of its session: the end of that one dispatches
    it again (chat.dispatch.run_next_dispatch). True when it is still queued for
    dispatch generation `attempt`."""
    return bool(
        Run.objects.filter(id=run.id, attempt=attempt, status=Run.Status.QUEUED).update(
            dispatched_at=None
        )
    )


# --- Claim and work ---------------------------------------------------------------------


def run_claim(*, run: Run, attempt: int) -> bool:
    """Queued -> running for dispatch generation `attempt`, under a fresh lease, unless
    an older run of its session has not ended (one answer at a time per session): True
    when this worker holds the run now. `run` is as read while queued for `attempt`."""
    claimed = (
        Run.objects.filter(id=run.id, attempt=attempt, status=Run.Status.QUEUED)
        .filter(~waits_behind_another())
        .update(
            status=Run.Status.RUNNING,
            starts=F("starts") + 1,
            lease_expires_at=lease_deadline(),
            worker=WORKER_NAME,
            started_at=timezone.now(),
        )
    )
    if claimed:
        # No read back: while queued for `attempt`, only this claim changes its starts.
        run.starts += 1
        run.status = Run.Status.RUNNING
    return bool(claimed)


def message_streaming(*, run: Run) -> None:
    """The answer starts (again): its text so far is replaced by what follows."""
    Message.objects.filter(
        id=run.message_id, status__in=(Message.Status.PENDING, Message.Status.STREAMING)
    ).update(status=Message.Status.STREAMING, content="", error="")


def run_model_set(*, run: Run, model: str) -> None:
    Run.objects.filter(id=run.id, attempt=run.attempt).update(model=model)


def run_steps_save(*, run: Run, steps: list[dict[str, Any]]) -> bool:
    """Write the run's steps, if the run is still this worker's."""
    return bool(
        Run.objects.filter(id=run.id, attempt=run.attempt, status=Run.Status.RUNNING).update(
            steps=_storable(steps)
        )
    )


def message_partial_keep(*, run: Run, content: str) -> None:
    """A cancelled answer keeps what was said before the cancel."""
    Message.objects.filter(
        id=run.message_id, status__in=(Message.Status.STREAMING, Message.Status.CANCELLED)
    ).update(content=_storable(content))


# --- Renew ----------------------------------------------------------------------------


def leases_renew(*, held: list[tuple[uuid.UUID, int]]) -> dict[uuid.UUID, tuple[int, str]]:
    """Extend the leases of the running runs held (run id, attempt); returns each held
    run's current (attempt, status), for the keeper to tell them what happened."""
    if not held:
        return {}
    mine = Q()
    for run_id, attempt in held:
        mine |= Q(id=run_id, attempt=attempt)
    Run.objects.filter(mine, status=Run.Status.RUNNING).update(lease_expires_at=lease_deadline())
    return {
        run_id: (attempt, status)
        for run_id, attempt, status in Run.objects.filter(
            id__in=[run_id for run_id, _attempt in held]
        ).values_list("id", "attempt", "status")
    }


# --- End ------------------------------------------------------------------------------


def run_end(
    *,
    run: Run,
    status: str,
    content: str | None = "",
    error: str = "",
    from_statuses: tuple[str, ...] = (Run.Status.RUNNING,),
    attempt: int | None = None,
    usage: dict[str, Any] | None = None,
    citations: list[dict[str, Any]] | None = None,
    first_token_at: datetime | None = None,
) -> bool:
    """End a run and its message once, conditionally (on its status, and on the dispatch
    generation when given): True when this call ended it. Says so on the event stream.
    `content` None leaves the message's text as it is (a cancel from outside the run).
    `usage` (governance.usage.usage_record's arguments, given by the worker that ends its
    own run) is written in the same transaction: a run never ends without its usage row,
    whatever fails between; when this call does not end the run, it is recorded on its
    own.

    The end commits with its event still owed (a finished run keeps a lease until the
    event is written): if this process dies or Redis fails in between, the recovery
    pass writes the event (`run_end_event_repair`), so a live client always sees how
    the answer ended."""
    fence = Q(id=run.id, status__in=from_statuses)
    if attempt is not None:
        fence &= Q(attempt=attempt)
    tokens = None
    error, content, citations = _storable(error), _storable(content), _storable(citations)
    with transaction.atomic():
        ended = Run.objects.filter(fence).update(
            status=status,
            error=error,
            finished_at=timezone.now(),
            lease_expires_at=lease_deadline(),
            **({"first_token_at": first_token_at} if first_token_at is not None else {}),
        )
        if ended:
            written = {"status": status, "error": error}
            if content is not None:
                written["content"] = content
            if citations is not None:
                written["citations"] = citations
            Message.objects.filter(id=run.message_id).update(**written)
            if usage is not None:
                tokens = usage_row_write(**usage)
            run_transitioned_send(run=run, status=status, error=error)
    if usage is not None:
        if not ended:
            usage_record(**usage)  # the cost was real, whoever ended the run
        elif tokens is not None:
            usage_charge(
                **{k: usage[k] for k in ("run_id", "project_id", "user_id", "accepted_at")},
                meter=usage["meter"],
                tokens=tokens,
                outcome=usage["outcome"],
            )
    if ended:
        event, data = {
            Run.Status.DONE: (
                streams.MESSAGE_COMPLETED,
                {"content": content, "status": status, "citations": citations or []},
            ),
            Run.Status.ERROR: (streams.MESSAGE_ERROR, {"error": error, "content": content}),
            Run.Status.CANCELLED: (streams.MESSAGE_CANCELLED, {}),
        }[status]
        try:
            streams.event_append(
                redis=_redis_of(run),
                session_id=run.session_id,
                event_type=event,
                data={"message_id": run.message_id, **data},
            )
            Run.objects.filter(id=run.id, status=status).update(lease_expires_at=None)
        except Exception:
            # Still owed: the recovery pass writes it once the lease ran out.
            logger.warning("run %s ended %s; the event was not written yet", run.id, status)
        # Governance hook: the run no longer counts as in flight against quotas.
        project = run.session.project
        usage_run_ended(
            run_id=run.id,
            project_id=project.id,
            user_id=project.owner_id,
            meter=usage["meter"] if usage is not None else None,
        )
    return bool(ended)


def _end_event(status: str, message: Message) -> tuple[str, dict[str, Any]]:
    return {
        Run.Status.DONE: (
            streams.MESSAGE_COMPLETED,
            {
                "content": message.content,
                "status": message.status,
                "citations": message.citations or [],
            },
        ),
        Run.Status.ERROR: (
            streams.MESSAGE_ERROR,
            {"error": message.error, "content": message.content},
        ),
        Run.Status.CANCELLED: (streams.MESSAGE_CANCELLED, {}),
    }[status]


# How far back in a session's stream the repair looks for an end already written.
END_EVENT_LOOKBACK = 200


def run_end_event_repair(*, run: Run) -> bool:
    """Write the end event a finished run still owes (its ender died, or Redis failed,
    between the commit and the event), unless the stream has it already; then release
    the run's lease. True when this call wrote it."""
    redis = _redis_of(run)
    wanted = {streams.MESSAGE_COMPLETED, streams.MESSAGE_ERROR, streams.MESSAGE_CANCELLED}
    tail = redis.xrevrange(streams.stream_key(run.session_id), count=END_EVENT_LOOKBACK)
    written = any(
        fields.get("type") in wanted
        and json.loads(fields.get("data") or "{}").get("message_id") == run.message_id
        for _, fields in tail
    )
    if not written:
        message = Message.objects.get(id=run.message_id)
        event, data = _end_event(run.status, message)
        streams.event_append(
            redis=redis,
            session_id=run.session_id,
            event_type=event,
            data={"message_id": run.message_id, **data},
        )
    Run.objects.filter(id=run.id, status=run.status).update(lease_expires_at=None)
    return not written


# --- Wait (stored, holding no worker) and resume ------------------------------------------


def run_suspend(
    *,
    run: Run,
    attempt: int,
    suspended: dict[str, Any],
    steps: list[dict[str, Any]],
    content: str,
    waiting_until: datetime,
    event: dict[str, Any],
    usage: dict[str, Any] | None = None,
) -> bool:
    """Running -> waiting for dispatch generation `attempt`: the run's state is stored
    (`suspended`: see chat.suspend), its answer so far kept on its message, its lease
    dropped (no worker holds it; the recovery pass leaves it alone) and what this attempt
    cost recorded in the same transaction (not released from the quotas' in-flight
    set: the run still counts, once, until it ends). Says `run.waiting` on the session's
    stream (`event`: its data, secrets already scrubbed). True when this call stored it."""
    with transaction.atomic():
        stored = Run.objects.filter(id=run.id, attempt=attempt, status=Run.Status.RUNNING).update(
            status=Run.Status.WAITING,
            suspended=_storable(suspended),
            steps=_storable(steps),
            waiting_until=waiting_until,
            lease_expires_at=None,
            worker="",
        )
        if stored:
            Message.objects.filter(id=run.message_id).update(content=_storable(content))
            tokens = usage_row_write(**usage) if usage is not None else None
            if suspended.get("reason") == "approval":
                # A person must act: subscribers hear of it (an agent call's wait is
                # the run's own business).
                run_transitioned_send(run=run, status="waiting")
    if not stored:
        if usage is not None:
            usage_record(**usage)  # the cost was real, whoever has the run now
        return False
    if usage is not None and tokens is not None:
        usage_charge(
            **{k: usage[k] for k in ("run_id", "project_id", "user_id", "accepted_at")},
            meter=usage["meter"],
            tokens=tokens,
            outcome=usage["outcome"],
        )
    run_event_append(run=run, event_type=streams.RUN_WAITING, data=event)
    return True


def run_event_append(*, run: Run, event_type: str, data: dict[str, Any]) -> None:
    """A run's event (`run.waiting`, `run.resumed`) on its session's stream; a lost one
    (Redis down) loses nothing stored: the run's API says the same."""
    try:
        streams.event_append(
            redis=_redis_of(run),
            session_id=run.session_id,
            event_type=event_type,
            data={"message_id": run.message_id, "run_id": str(run.id), **data},
        )
    except Exception:
        logger.warning("run %s: %s event not written", run.id, event_type)


def run_resume(*, run_id: uuid.UUID | str, change) -> Run | None:
    """Waiting -> queued as a new attempt, for its dispatch to any worker, if `change`
    (called with the run's locked row and its stored state, which it may update) says
    so by returning True. Returns the run when this call resumed it. The row is locked
    while `change` decides, so two deciders (an approval and a reject, two callees
    ending at once) see each other."""
    with transaction.atomic():
        run = Run.objects.select_for_update().filter(id=run_id, status=Run.Status.WAITING).first()
        if run is None or not run.suspended:
            return None
        suspended = dict(run.suspended)
        if not change(run, suspended):
            return None
        Run.objects.filter(id=run.id, attempt=run.attempt, status=Run.Status.WAITING).update(
            status=Run.Status.QUEUED,
            suspended=suspended,
            attempt=F("attempt") + 1,
            # A resumed run starts afresh: its restarts are counted from here.
            starts=0,
            waiting_until=None,
            dispatched_at=None,
        )
    run = Run.objects.select_related("session__project").get(id=run.id)
    return run


# --- Take back --------------------------------------------------------------------------


def run_take_back(
    *,
    run: Run,
    from_status: str,
    attempt: int | None = None,
    suspended: dict[str, Any] | None = None,
) -> bool:
    """Put a run back to queued as a new attempt, for the recovery pass to dispatch:
    True when this call took it (fenced on its status and dispatch generation).
    `suspended`: the state its next start goes on from (chat.suspend, "handed-back")."""
    taken = Run.objects.filter(
        id=run.id, attempt=run.attempt if attempt is None else attempt, status=from_status
    ).update(
        status=Run.Status.QUEUED,
        attempt=F("attempt") + 1,
        lease_expires_at=None,
        dispatched_at=None,
        **({"suspended": _storable(suspended)} if suspended is not None else {}),
    )
    if not taken:
        return False
    run.refresh_from_db(fields=["attempt", "status"])
    if from_status == Run.Status.RUNNING:
        Message.objects.filter(id=run.message_id, status=Message.Status.STREAMING).update(
            status=Message.Status.PENDING
        )
    return True


def run_transitioned_send(*, run: Run, status: str, error: str = "") -> None:
    """Announce (inside the caller's transaction) that `run` ended or now waits: the
    one place the chat app tells others (automation's webhooks) about a run's end."""
    project = run.session.project
    signals.run_transitioned.send(
        sender=Run,
        run_id=run.id,
        project_id=project.id,
        user_id=project.owner_id,
        session_id=run.session_id,
        message_id=run.message_id,
        agent_id=run.agent_id,
        status=status,
        error=error,
    )


def _redis_of(run: Run) -> ScopedRedis:
    project = run.session.project
    return scoped(project.owner_id, project.id)
