"""Tearing down a deleted project's workspace, and the sweep that repairs what a crash or
an outage left behind. Both run on workers (maintenance queue)."""

from __future__ import annotations

import logging
import time
import uuid
from contextlib import suppress
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db.models import F
from django.db.models.functions import Coalesce
from django.utils import timezone
from redis.exceptions import LockError

from agentbus import project_queues_in_keyspace, project_revive, project_tombstone, retire_project
from common.redis import get_redis
from projects.models import Project

from . import registry
from .manager import get_worker_space_manager
from .models import WorkspaceTeardown
from .redis import KEY_NAMESPACE
from .registry import State
from .services import as_uuid, workspace_teardown_dispatch, workspace_teardown_schedule
from .signals import workspace_teardown
from .space import UserWorkerSpace

logger = logging.getLogger(__name__)


def workspace_teardown_run(*, user_id: int, project_id: uuid.UUID | str) -> dict[str, Any] | None:
    """Tear down a deleted project's workspace: retire its queue (purge, cancel
    consumers, leave the active set), delete every key under its prefix, let receivers
    drop what lives elsewhere (vector collections), forget it in the registry index.

    Idempotent; raises while a backend is down (the task retries with backoff). Returns
    None when nothing is owed (row gone, already done, or the project exists).
    """
    project_id = as_uuid(project_id)
    row = WorkspaceTeardown.objects.filter(project_id=project_id).first()
    if row is None or row.status == WorkspaceTeardown.Status.DONE:
        return None
    if Project.objects.filter(id=project_id).exists():
        # Only a deleted project's workspace is torn down; the row is a mistake, and a
        # tombstone set by it must not outlive it.
        logger.warning("teardown of %s skipped: the project exists", project_id)
        project_revive(project_id)
        WorkspaceTeardown.objects.filter(pk=row.pk).update(
            status=WorkspaceTeardown.Status.DONE,
            completed_at=timezone.now(),
            last_error="skipped: the project exists",
        )
        return None
    WorkspaceTeardown.objects.filter(pk=row.pk).update(
        attempts=F("attempts") + 1, last_attempt_at=timezone.now()
    )
    try:
        result = _teardown(user_id=user_id, project_id=project_id)
    except Exception as exc:
        WorkspaceTeardown.objects.filter(pk=row.pk).update(
            last_error=f"{type(exc).__name__}: {exc}"[:2000]
        )
        raise
    WorkspaceTeardown.objects.filter(pk=row.pk).update(
        status=WorkspaceTeardown.Status.DONE,
        completed_at=timezone.now(),
        last_error="",
        purged_tasks=result["purged_tasks"],
    )
    logger.info("workspace %s_%s torn down: %s", user_id, project_id, result)
    return result


def _teardown(*, user_id: int, project_id: uuid.UUID) -> dict[str, Any]:
    get_worker_space_manager().remove(user_id=user_id, project_id=project_id)
    space = UserWorkerSpace(user_id=user_id, project_id=project_id)
    # Wait out an initialisation in progress, so it cannot write keys after ours go.
    lock = space._init_lock()
    locked = lock.acquire()
    try:
        if space.redis.exists(registry.STATE_KEY):
            registry.mark_state(space.redis, State.CLEANING)
        project_tombstone(project_id)
        purged = retire_project(project_id)
        removed = space.redis.delete_all()  # the lock key goes with them
    finally:
        if locked:
            with suppress(LockError):
                lock.release()
    workspace_teardown.send(sender=UserWorkerSpace, user_id=user_id, project_id=project_id)
    registry.index_remove(user_id, project_id)
    return {"purged_tasks": purged, "removed_keys": removed}


# --- sweep -------------------------------------------------------------------------


# Re-exported: where the sweep keeps its orphan candidates (index member -> first seen).
SUSPECTS_KEY = registry.SUSPECTS_KEY
# Owner of a project queue that nothing else names (no row, no prefix, no teardown).
UNKNOWN_OWNER = 0


def workspace_sweep(
    *, redispatch_after: float | None = None, batch: int | None = None
) -> dict[str, int]:
    """Periodic repair (Celery beat), at a bounded cost per run.

    1. Teardowns owed but not progressing for `redispatch_after` seconds (the process
       crashed between commit and dispatch, the broker was down) are dispatched again.
    2. The next `batch` workspaces of the registry index (the walk resumes where the last
       run stopped, from a cursor kept in Redis, and starts over once it reaches the
       end), a bounded slice of the keyspace (keys under a workspace prefix that escaped
       the index), and the suspects of earlier runs are checked: anything with no project
       row behind it gets a teardown, once two sweeps at least `redispatch_after` seconds
       apart saw it orphaned, so a project whose creating transaction has not committed
       yet is never taken for an orphan. The walked workspaces' state sets are
       reconciled with their registry entries on the way.
    """
    if redispatch_after is None:
        redispatch_after = settings.WORKSPACE_TEARDOWN_REDISPATCH_SECONDS
    batch = batch or settings.WORKSPACE_SWEEP_BATCH
    cut = timezone.now() - timedelta(seconds=redispatch_after)
    owed = list(
        WorkspaceTeardown.objects.filter(status=WorkspaceTeardown.Status.PENDING)
        .annotate(activity=Coalesce("last_attempt_at", "dispatched_at", "created_at"))
        .filter(activity__lt=cut)
        .values_list("project_id", flat=True)
    )
    redispatched = sum(workspace_teardown_dispatch(project_id=p) for p in owed)

    client = get_redis()
    walked, lap_done = _walk_index(batch)
    registry.state_reconcile(walked)
    candidates = {m for m in map(registry.parse_index_member, walked) if m is not None}
    candidates |= _walk_keyspace(settings.WORKSPACE_SWEEP_SCAN_KEYS)
    seen = {m: float(t) for m, t in client.hgetall(SUSPECTS_KEY).items()}
    candidates |= {m for m in map(registry.parse_index_member, seen) if m is not None}
    if lap_done:
        # Queues whose project left nothing else behind: a broker scan, once per lap.
        candidates |= _queues_without_workspace({p for _, p in candidates})

    project_ids = {p for _, p in candidates}
    live = set(Project.objects.filter(id__in=project_ids).values_list("id", "owner_id"))
    pending = set(
        WorkspaceTeardown.objects.filter(
            project_id__in=project_ids, status=WorkspaceTeardown.Status.PENDING
        ).values_list("project_id", flat=True)
    )
    checked = {registry.index_member(u, p) for u, p in candidates}
    orphans = {
        registry.index_member(u, p)
        for u, p in candidates
        if (p, u) not in live and p not in pending
    }
    now = time.time()
    confirmed = sorted(m for m in orphans if m in seen and now - seen[m] >= redispatch_after)
    pipe = client.pipeline(transaction=False)
    for member in (seen.keys() & checked) - orphans:
        pipe.hdel(SUSPECTS_KEY, member)  # no longer orphaned (or torn down meanwhile)
    for member in orphans - seen.keys():
        pipe.hset(SUSPECTS_KEY, member, now)
    pipe.execute()
    for member in confirmed:
        user_id, project_id = registry.parse_index_member(member)
        logger.warning("sweep: workspace %s_%s has no project row", user_id, project_id)
        workspace_teardown_schedule(user_id=user_id, project_id=project_id)
        client.hdel(SUSPECTS_KEY, member)
    return {
        "redispatched": redispatched,
        "orphans": len(confirmed),
        "suspects": len(orphans) - len(confirmed),
        "checked": len(walked),
    }


def _walk_index(batch: int) -> tuple[list[str], bool]:
    """The next `batch` members of the registry index after the persisted cursor, and
    whether the walk reached the end (then it starts over next time)."""
    client = get_redis()
    _adopt_legacy_index(batch)
    cursor = client.hget(registry.SWEEP_CURSOR_KEY, "index") or ""
    members = registry.index_after(cursor, limit=batch)
    lap_done = len(members) < batch
    client.hset(registry.SWEEP_CURSOR_KEY, "index", "" if lap_done else members[-1])
    return members, lap_done


def _adopt_legacy_index(batch: int) -> None:
    """Move members of the earlier versions' index (a set) into the sorted one."""
    client = get_redis()
    if client.type(registry.LEGACY_INDEX_KEY) != "set":
        return
    for member in client.spop(registry.LEGACY_INDEX_KEY, batch) or ():
        parsed = registry.parse_index_member(member)
        if parsed is not None:
            registry.index_add(*parsed)


def _walk_keyspace(budget: int) -> set[tuple[int, uuid.UUID]]:
    """Workspaces with keys in the next slice of the keyspace (about `budget` keys
    looked at), from the SCAN cursor the last run left."""
    client = get_redis()
    cursor = int(client.hget(registry.SWEEP_CURSOR_KEY, "keys") or 0)
    found: set[tuple[int, uuid.UUID]] = set()
    looked = 0
    while True:
        cursor, keys = client.scan(cursor, match=f"{KEY_NAMESPACE}:*", count=1000)
        for key in keys:
            parsed = registry.parse_prefix(key)
            if parsed is not None:
                found.add(parsed)
        looked += 1000
        if cursor == 0 or looked >= budget:
            break
    client.hset(registry.SWEEP_CURSOR_KEY, "keys", cursor)
    return found


def _queues_without_workspace(known: set[uuid.UUID]) -> set[tuple[int, uuid.UUID]]:
    """Project queues in the broker of projects nothing else named (owner from the
    project or teardown row, or UNKNOWN_OWNER)."""
    queued = project_queues_in_keyspace() - known
    if not queued:
        return set()
    owners = dict(Project.objects.filter(id__in=queued).values_list("id", "owner_id"))
    owners.update(
        WorkspaceTeardown.objects.filter(project_id__in=queued - owners.keys()).values_list(
            "project_id", "user_id"
        )
    )
    return {(owners.get(p, UNKNOWN_OWNER), p) for p in queued}
