"""Runs on the web and maintenance side: dispatching them onto the project's bus,
cancelling them, and the recovery pass that answers every accepted message whatever died.

A run is accepted in the same transaction as its message (the outbox). After commit it
is dispatched: its id goes into the workspace's `runs:dispatched` mark and its task on
the project's queue; the worker that receives the task writes its id in the mark, and
the run's start removes it. The recovery pass (`runs_recover`, beat, every
RUN_RECOVERY_SECONDS):

- a run still queued RUN_REDISPATCH_SECONDS after its dispatch (or never dispatched:
  Redis or the broker was down at commit, the process died) is dispatched again when
  its task is lost: its mark is missing (lost with Redis), names a worker that is gone
  (killed holding it: the broker would give it back only after its visibility timeout),
  or says "on the queue" while the project's queue is empty;
- a running run whose lease expired (its worker was killed) is dispatched again, its
  next start says `message.restarted` to the client;
- a run that cannot start within RUN_QUEUE_TIMEOUT_SECONDS, or whose workers were lost
  RUN_MAX_STARTS times, ends in error with the reason;
- a finished run whose end event is still owed (it keeps its lease until the event is
  written: its ender died, or Redis failed, after the commit) gets the event written.

Every dispatch carries a new `attempt`: only the latest may claim the run, so a lost
message that turns up later, or a duplicate, does nothing.

A session answers one message at a time: a run accepted while an older run of its
session is active (the agent's `enqueue` policy) waits, undispatched, and neither a
worker nor the recovery pass starts it before the older one ended; the end of a run
dispatches the next waiting one (`run_next_dispatch`).

Every status write here (dispatched, ended, taken back) is chat.state's.
"""

from __future__ import annotations

import contextlib
import logging
import time
from datetime import timedelta

from celery import current_app
from django.conf import settings
from django.db.models import OuterRef, Q, Subquery
from django.utils import timezone

from agentbus import live_workers, project_gone, publish, queue_depths
from workspaces.lifecycle import project_tombstone_heal
from workspaces.manager import get_worker_space
from workspaces.redis import ScopedRedis, scoped

from . import streams
from .models import Message, Run
from .state import (
    ACTIVE,
    lease_ended,
    run_dispatched,
    run_end,
    run_end_event_repair,
    run_take_back,
    runs_active,
    waits_behind_another,
)

logger = logging.getLogger(__name__)

# The task that answers a run on a worker (chat.tasks.run_agent), sent by its name: the
# web side puts a run on the bus without importing the engine the task runs.
RUN_TASK = "agents.run_agent"


def _run_task():
    # The project's app in every thread (Celery's Django fixup makes it the default app),
    # as a @shared_task proxy would resolve it; chat.tasks is imported by ChatConfig.ready.
    return current_app.tasks[RUN_TASK]


def run_dispatch(
    *,
    run: Run,
    announce: tuple[Message, ...] = (),
    start: bool = True,
    dispatched_at_written: bool = False,
) -> None:
    """Put the run's current attempt on the project's bus (first announcing `announce`
    on the session's stream; only that unless `start`). Raises while Redis or the
    broker is down: the run stays queued and the recovery pass dispatches it later.
    `dispatched_at_written`: the run was stored with its dispatch time (run_create)."""
    project = run.session.project
    space = get_worker_space(user_id=project.owner_id, project_id=project.id)
    with space.use():
        # Marked first: a worker may receive the task before publish returns.
        marks = [str(run.id)] if start else []
        if announce:
            # First, so a client sees the messages before the worker's first delta; the
            # mark in the same round trip.
            streams.events_append(
                redis=space.redis,
                session_id=run.session_id,
                events=[(streams.MESSAGE_CREATED, streams.message_event_data(m)) for m in announce],
                runs_dispatched=marks,
            )
        elif marks:
            streams.runs_mark_dispatched(redis=space.redis, run_ids=marks)
        if not start:
            return  # it waits for an older run of its session (run_next_dispatch)
        try:
            publish(
                _run_task(),
                project_id=project.id,
                kwargs={
                    "user_id": project.owner_id,
                    "run_id": str(run.id),
                    "attempt": run.attempt,
                },
                lane=run.lane,
            )
        except Exception:
            with contextlib.suppress(Exception):  # unmarked, or lost with Redis: the same
                streams.runs_unmark(redis=space.redis, run_ids=[str(run.id)])
            raise
    if not dispatched_at_written:
        run_dispatched(run=run)


def runs_cancel(*, session) -> list[int]:
    """Stop the session's runs that have not ended, and the runs they asked of other
    agents (their trees): returns the ids of the session's assistant messages whose runs
    this call ended (cancelled). A running run's worker sees it at its next delta (the
    flag) or lease renewal (the database) and stops."""
    live = list(runs_active(session_id=session.id).select_related("session__project"))
    ended = _cancel_trees(live)
    return [run.message_id for run in live if run.id in ended]


def run_cancel(*, run: Run) -> bool:
    """Stop one run (queued or running) and the runs it asked of other agents: True when
    this call ended it. The session's next waiting run, if any, is dispatched."""
    ended = run.id in _cancel_trees([run])
    run_next_dispatch(session_id=run.session_id)
    return ended


def run_children_cancel(*, run: Run) -> set:
    """Cancel the runs `run` asked of other agents (and theirs), not `run` itself (a
    caller that waited too long for them goes on without their answers)."""
    children = list(Run.objects.filter(parent_id=run.id).select_related("session__project"))
    return _cancel_trees(children) if children else set()


def _cancel_trees(runs: list[Run]) -> set:
    """Cancel `runs` and their descendants that have not ended; the ids it ended."""
    tree, frontier = list(runs), [run.id for run in runs]
    while frontier:  # at most AGENT_CALL_MAX_DEPTH rounds
        children = list(
            Run.objects.filter(parent_id__in=frontier).select_related("session__project")
        )
        tree += children
        frontier = [child.id for child in children]
    live = [run for run in tree if run.status in ACTIVE]
    if not live:
        return set()
    try:
        # The flags first: no delta of these runs reaches a stream after them.
        streams.cancel_request(redis=_redis(live[0]), message_ids=[r.message_id for r in live])
    except Exception:
        logger.warning("cancel flags not set (Redis down?): runs stop at their lease renewal")
    return {
        run.id
        for run in live
        if run_end(
            run=run,
            status=Run.Status.CANCELLED,
            content=None,
            from_statuses=ACTIVE,
        )
    }


def run_next_dispatch(*, session_id) -> bool:
    """Dispatch the session's oldest active run if it waits undispatched (its older
    runs ended). Never raises: if this is lost, the recovery pass dispatches it."""
    try:
        first = (
            runs_active(session_id=session_id)
            .select_related("session__project")
            .order_by("created_at")
            .first()
        )
        if first is None or first.status != Run.Status.QUEUED or first.dispatched_at:
            return False
        run_dispatch(run=first)
        return True
    except Exception:
        logger.warning("session %s: next run not dispatched; recovery will", session_id)
        return False


def _redis(run: Run) -> ScopedRedis:
    project = run.session.project
    return scoped(project.owner_id, project.id)


def runs_recover(*, budget: float | None = None) -> dict[str, int]:
    """The recovery pass (see the module docstring). Returns what it did.

    It keeps its own time limit (`budget` seconds, by default its interval,
    RUN_RECOVERY_SECONDS), as Celery's are not enforced in the thread pool: past it, it
    stops between runs and the next pass goes on (`unfinished` in what it returns)."""
    deadline = time.monotonic() + (settings.RUN_RECOVERY_SECONDS if budget is None else budget)
    now = timezone.now()
    done = {"redispatched": 0, "restarted": 0, "expired": 0, "ends_written": 0}

    def in_time(runs):
        for run in runs:
            if time.monotonic() >= deadline:
                done["unfinished"] = 1
                return
            yield run

    give_up = now - timedelta(seconds=settings.RUN_QUEUE_TIMEOUT_SECONDS)
    # A resumed run (it waited: chat.suspend) was accepted long ago: not a run that
    # could not start; RUN_MAX_STARTS bounds it.
    never_started = Q(status=Run.Status.QUEUED, created_at__lt=give_up, suspended__isnull=True)
    for run in in_time(_runs(never_started)):
        if run_end(
            run=run,
            status=Run.Status.ERROR,
            from_statuses=(Run.Status.QUEUED,),
            attempt=run.attempt,
            error="the agent run could not be started in time; ask again",
        ):
            done["expired"] += 1

    stale = now - timedelta(seconds=settings.RUN_REDISPATCH_SECONDS)
    queued = _runs(
        Q(status=Run.Status.QUEUED)
        & (Q(dispatched_at__lt=stale) | Q(dispatched_at__isnull=True, created_at__lt=stale))
        & ~waits_behind_another()
    )
    for run in in_time(_lost(queued)):
        done["redispatched"] += _redispatch(run, from_status=Run.Status.QUEUED)

    for run in in_time(_runs(Q(status=Run.Status.RUNNING) & lease_ended())):
        done["restarted"] += _redispatch(run, from_status=Run.Status.RUNNING)

    # A finished run still holding its lease owes its end event (its ender died, or
    # Redis failed, between the commit and the event): a live client waits for it.
    for run in in_time(_runs(Q(status__in=Run.FINISHED) & lease_ended())):
        try:
            done["ends_written"] += run_end_event_repair(run=run)
        except Exception:
            logger.warning("run %s: end event not written; the next pass tries again", run.id)
    if any(done.values()):
        logger.warning("run recovery: %s", done)
    return done


def _runs(condition: Q, limit: int = 500) -> list[Run]:
    return list(
        Run.objects.filter(condition)
        .select_related("session__project")
        .order_by("created_at")[:limit]
    )


def _lost(runs: list[Run]) -> list[Run]:
    """The queued runs whose task no worker will run (see the module docstring)."""
    # Never dispatched (or taken back from an interrupted start): nothing to wait for.
    lost: list[Run] = [run for run in runs if run.dispatched_at is None]
    by_project: dict = {}
    for run in runs:
        if run.dispatched_at is not None:
            by_project.setdefault(run.session.project_id, []).append(run)
    if not by_project:
        return lost
    try:
        live = {worker["id"] for worker in live_workers()}
        depths = dict(zip(by_project, queue_depths(list(by_project)), strict=True))
        for project_id, project_runs in by_project.items():
            marks = streams.runs_marks(
                redis=_redis(project_runs[0]), run_ids=[str(r.id) for r in project_runs]
            )
            for run in project_runs:
                mark = marks[str(run.id)]
                if mark is None:
                    lost.append(run)  # lost with Redis
                elif mark:
                    if mark not in live:
                        lost.append(run)  # its worker is gone
                elif depths[project_id] == 0:
                    lost.append(run)  # "on the queue", which is empty
    except Exception:
        logger.warning("run recovery: Redis unavailable", exc_info=True)
    return lost


def _redispatch(run: Run, *, from_status: str) -> int:
    """Take the run back (a new attempt) and dispatch it; 1 if dispatched."""
    project_id = run.session.project_id
    if project_gone(project_id) and not project_tombstone_heal(project_id=project_id):
        return 0  # being deleted: its teardown removes it
    if not run_take_back(run=run, from_status=from_status):
        return 0
    try:
        run_dispatch(run=run)
    except Exception:
        logger.warning("run %s: dispatch failed; the next pass tries again", run.id)
        return 0
    return 1


def run_next_dispatch_after(*, run_id) -> Run | None:
    """After a worker is done with `run_id`: if it ended, its session's next waiting run
    goes on the bus. Returns the run (its session and caller) when it ended, else None.
    One query when no run of its session is left to go on (the common case)."""
    oldest_active = (
        runs_active(session_id=OuterRef("session_id")).order_by("created_at").values("id")[:1]
    )
    ended = list(
        Run.objects.filter(id=run_id, status__in=Run.FINISHED)
        .annotate(next_id=Subquery(oldest_active))
        .order_by()
        .only("session_id", "parent_id")
    )
    if not ended:
        return None
    if ended[0].next_id is not None:
        run_next_dispatch(session_id=ended[0].session_id)
    return ended[0]
