"""Retention: how long a project's data is kept, and the sweep that removes the rest.

Periods come from the deployment (settings RETENTION_*_DAYS, 0: keep forever) unless
the project has its own (`RetentionPolicy`: null follows the deployment, 0 keeps
forever). The audit log keeps its own, longer clock (AUDIT_RETENTION_DAYS,
governance.tasks.purge_audit).

The sweep (`retention_sweep`, beat every RETENTION_SWEEP_SECONDS) works like a bulk
job, never like a lock: every step removes at most RETENTION_CHUNK rows in one short
transaction, so a project's chat never waits long behind it, and the whole sweep stops
at RETENTION_SWEEP_BUDGET_SECONDS (the next one goes on where this left rows). It
records what it removed (`RetentionReport`).

Kinds are a registry (`retention_kind_register`): another app (webhook deliveries, say)
adds its own with a policy field name, its deployment default and a chunk remover.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import OuterRef, Q, QuerySet, Subquery
from django.utils import timezone

from chat import streams
from chat.models import ChatSession, Message, Run
from chat.state import runs_steps_forget
from governance.models import EmbeddingUsage, RunUsage
from governance.rollups import usage_rollup_chunk
from projects.models import Project
from projects.services import project_lock_for_write
from workspaces.redis import scoped

from .models import RetentionPolicy, RetentionReport

logger = logging.getLogger(__name__)

# Sessions whose messages one chunk takes from (their messages up to the chunk's size).
SESSIONS_PER_CHUNK = 100


@dataclass(frozen=True)
class RetentionKind:
    # The RetentionPolicy field (and the API's key) that holds its period in days.
    name: str
    # The deployment's default period (days; 0: keep forever).
    default: Callable[[], int]
    # Remove at most `limit` of the project's items older than `cutoff`, in one short
    # transaction; return how many went (0: nothing more is due).
    remove: Callable[[Project, datetime, int], int]
    # False: one call does all that is due (e.g. one Redis pipeline), never repeated.
    chunked: bool = True
    # Called once at the end of a sweep that removed any of it (e.g. the vector store's
    # vacuum, so removed text leaves the disk too).
    finish: Callable[[], None] | None = None


_KINDS: dict[str, RetentionKind] = {}


def retention_kind_register(
    name: str,
    *,
    default: Callable[[], int],
    remove: Callable[[Project, datetime, int], int],
    chunked: bool = True,
    finish: Callable[[], None] | None = None,
) -> None:
    _KINDS[name] = RetentionKind(
        name=name, default=default, remove=remove, chunked=chunked, finish=finish
    )


def retention_kinds() -> dict[str, RetentionKind]:
    return dict(_KINDS)


# --- The kinds this deployment has -------------------------------------------------------


def sessions_inactive(*, project: Project, cutoff: datetime) -> QuerySet[ChatSession]:
    """The project's sessions with no message since `cutoff` (nor created since). A
    session's last message is its newest id (one step down the (session, id) index), so
    finding a chunk's sessions never reads all their messages."""
    last = Message.objects.filter(session=OuterRef("pk")).order_by("-id").values("created_at")
    return (
        ChatSession.objects.filter(project=project, created_at__lt=cutoff)
        .annotate(last=Subquery(last[:1]))
        .filter(Q(last__lt=cutoff) | Q(last__isnull=True))
        .order_by("created_at", "id")
    )


def _remove_sessions(project: Project, cutoff: datetime, limit: int) -> int:
    """Messages (with their runs) of inactive sessions, `limit` at a time; a session
    whose messages are all gone goes too, with its event stream."""
    expired = sessions_inactive(project=project, cutoff=cutoff)
    session_ids = list(expired.values_list("id", flat=True)[:SESSIONS_PER_CHUNK])
    if not session_ids:
        return 0
    with transaction.atomic():
        ids = list(
            Message.objects.filter(session_id__in=session_ids)
            .order_by("session_id", "id")
            .values_list("id", flat=True)[:limit]
        )
        # Their runs first (with the runs those asked of other agents: the ORM's
        # cascade); then the messages in one statement, nothing else points at them.
        Run.objects.filter(message_id__in=ids).delete()
        removed = Message.objects.filter(id__in=ids)._raw_delete(Message.objects.db) or 0
        if len(ids) < limit:  # these sessions are empty now: they go, with their streams
            emptied = [
                sid for sid in session_ids if not Message.objects.filter(session_id=sid).exists()
            ]
            _total, per_model = ChatSession.objects.filter(id__in=emptied).delete()
            removed += per_model.get(ChatSession._meta.label, 0)
            keys = [streams.stream_key(sid) for sid in emptied]
            redis = scoped(project.owner_id, project.id)
            if keys:
                transaction.on_commit(lambda: redis.delete(*keys), robust=True)
    return removed


def _remove_run_steps(project: Project, cutoff: datetime, limit: int) -> int:
    ids = list(
        Run.objects.filter(session__project=project, finished_at__lt=cutoff)
        .exclude(steps=[])
        .values_list("id", flat=True)[:limit]
    )
    return runs_steps_forget(run_ids=ids) if ids else 0


def _remove_events(project: Project, cutoff: datetime, limit: int) -> int:
    """Trim the project's session streams to the events since `cutoff` (stream ids are
    their times in ms). Streams expire STREAM_TTL_SECONDS after their last event, so only
    sessions active within that window can hold one."""
    if (timezone.now() - cutoff).total_seconds() >= streams.STREAM_TTL_SECONDS:
        return 0  # the streams' own TTL is shorter than this period
    live_since = timezone.now() - timedelta(seconds=streams.STREAM_TTL_SECONDS)
    sessions = list(
        ChatSession.objects.filter(project=project, messages__created_at__gte=live_since)
        .distinct()
        .values_list("id", flat=True)
    )
    if not sessions:
        return 0
    redis = scoped(project.owner_id, project.id)
    minid = f"{int(cutoff.timestamp() * 1000)}-0"
    pipe = redis.pipeline(transaction=False)
    for session_id in sessions:
        pipe.xtrim(streams.stream_key(session_id), minid=minid, approximate=False)
    return sum(int(n or 0) for n in pipe.execute())


def _remove_usage(project: Project, cutoff: datetime, limit: int) -> int:
    day = cutoff.date()
    done = usage_rollup_chunk(
        runs=RunUsage.objects.filter(project_id=project.id, day__lt=day),
        embeddings=EmbeddingUsage.objects.filter(project_id=project.id, day__lt=day),
        limit=limit,
    )
    return max(done.values())


retention_kind_register(
    "sessions_days", default=lambda: settings.RETENTION_SESSIONS_DAYS, remove=_remove_sessions
)
retention_kind_register(
    "run_steps_days", default=lambda: settings.RETENTION_RUN_STEPS_DAYS, remove=_remove_run_steps
)
retention_kind_register(
    "events_days",
    default=lambda: settings.RETENTION_EVENTS_DAYS,
    remove=_remove_events,
    chunked=False,
)
retention_kind_register(
    "usage_days", default=lambda: settings.RETENTION_USAGE_DAYS, remove=_remove_usage
)


# --- Policies ------------------------------------------------------------------------


def retention_effective(*, policy: RetentionPolicy | None) -> dict[str, int]:
    """Each kind's period in days for a project with `policy` (0: kept forever)."""
    result = {}
    for name, kind in _KINDS.items():
        own = getattr(policy, name, None) if policy is not None else None
        result[name] = int(kind.default() if own is None else own)
    return result


@transaction.atomic
def retention_policy_set(*, project: Project, data: dict[str, int | None]) -> RetentionPolicy:
    """Set the project's own periods (the fields given; null: the deployment's)."""
    project_lock_for_write(project_id=project.id)  # a 404 if a delete came first
    policy, _ = RetentionPolicy.objects.select_for_update().get_or_create(project=project)
    for name, value in data.items():
        if name in RetentionPolicy.KINDS:
            setattr(policy, name, value)
    policy.save()
    return policy


# --- The sweep ------------------------------------------------------------------------


def retention_sweep(
    *,
    budget_seconds: float | None = None,
    chunk: int | None = None,
    project_ids: list[uuid.UUID] | None = None,
    now: datetime | None = None,
) -> RetentionReport:
    """Remove what every project's periods let go, chunk by chunk, within the budget."""
    budget = settings.RETENTION_SWEEP_BUDGET_SECONDS if budget_seconds is None else budget_seconds
    chunk = chunk or settings.RETENTION_CHUNK
    now = now or timezone.now()
    deadline = time.monotonic() + budget
    report = RetentionReport.objects.create(started_at=now)
    removed = dict.fromkeys(_KINDS, 0)
    complete = True
    projects = Project.objects.select_related("retention").order_by("id")
    if project_ids is not None:
        projects = projects.filter(id__in=project_ids)
    for project in projects.iterator(chunk_size=500):
        report.projects += 1
        periods = retention_effective(policy=getattr(project, "retention", None))
        for name, days in periods.items():
            if not days:
                continue
            cutoff = now - timedelta(days=days)
            while True:
                if time.monotonic() >= deadline:
                    complete = False
                    break
                kind = _KINDS[name]
                count = kind.remove(project, cutoff, chunk)
                report.chunks += 1
                removed[name] += count
                if count == 0 or not kind.chunked:
                    break
            if not complete:
                break
        if not complete:
            break
    for name, count in removed.items():
        if count and _KINDS[name].finish is not None:
            _KINDS[name].finish()
    report.removed = removed
    report.complete = complete
    report.finished_at = timezone.now()
    report.save()
    if any(removed.values()) or not complete:
        logger.info("retention sweep removed %s (complete: %s)", removed, complete)
    return report
