"""Writes of workspaces: keeping the AgentCache and bus in step with agent writes, reset,
and the durable teardown of a deleted project's workspace."""

from __future__ import annotations

import logging
import time
import uuid
from contextlib import suppress
from datetime import timedelta
from functools import partial
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import F
from django.db.models.functions import Coalesce
from django.utils import timezone
from redis.exceptions import LockError

from projects.models import Project

from . import registry
from .manager import get_worker_space_manager
from .models import WorkspaceTeardown
from .queues import MAINTENANCE_QUEUE, project_id_from_queue
from .redis import KEY_NAMESPACE, get_redis
from .registry import State
from .signals import workspace_teardown
from .space import UserWorkerSpace, agent_bus

logger = logging.getLogger(__name__)


def _as_uuid(value: uuid.UUID | str) -> uuid.UUID:
    return value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))


def _handle(*, user_id: int, project_id: uuid.UUID) -> UserWorkerSpace:
    """This process's handle on the workspace, or a detached one that does not
    initialise anything (for writes that must not bring a workspace to life)."""
    space = get_worker_space_manager().get(user_id=user_id, project_id=project_id)
    return space or UserWorkerSpace(user_id=user_id, project_id=project_id)


# --- agents ------------------------------------------------------------------------


def workspace_agent_sync(*, project_id: uuid.UUID | str, agent_id: uuid.UUID | str) -> None:
    """Bring the workspace's AgentCache and bus registration in line with the database
    for one agent, after an agent write committed (create, update or delete).

    Reads the committed row, so it is idempotent and order-independent. A workspace
    that is not initialised is left alone (its initialisation loads the agents), except
    for a deletion, which is always announced so the agent's collection is dropped.
    """
    from agents.models import Agent
    from agents.selectors import agent_config

    project_id = _as_uuid(project_id)
    owner_id = Project.objects.filter(id=project_id).values_list("owner_id", flat=True).first()
    if owner_id is None:
        return  # the project is gone: its teardown takes care of everything
    space = _handle(user_id=owner_id, project_id=project_id)
    agent = Agent.objects.filter(id=agent_id, project_id=project_id).first()
    if agent is None:
        space.remove_agent(agent_id)
        return
    state, _ = registry.read_state(space.redis)
    if state not in (State.INITIALIZED, State.INITIALIZING):
        return
    config = agent_config(agent)
    if space.agent_cache.peek(agent.id) is None:
        space.add_agent(config)
    else:
        space.agent_cache.put(config)


def workspace_agent_sync_on_commit(*, project_id: uuid.UUID, agent_id: uuid.UUID) -> None:
    """Schedule `workspace_agent_sync` for after the current transaction commits. A
    failure there (Redis down) is logged, not raised: the write is committed, and the
    cache heals on a miss or at the next initialisation."""
    transaction.on_commit(
        partial(workspace_agent_sync, project_id=project_id, agent_id=agent_id), robust=True
    )


def workspace_reset(*, user_id: int, project_id: uuid.UUID | str) -> None:
    """Operator action: drop the workspace's cache and bus registrations; the next use
    (in any process) initialises it again from the database."""
    _handle(user_id=user_id, project_id=_as_uuid(project_id)).reset()


# --- teardown ----------------------------------------------------------------------


def workspace_teardown_schedule(*, user_id: int, project_id: uuid.UUID | str) -> WorkspaceTeardown:
    """Record that the workspace's teardown is owed, in the caller's transaction, and
    put it on the bus once that commits."""
    project_id = _as_uuid(project_id)
    row, _ = WorkspaceTeardown.objects.update_or_create(
        project_id=project_id,
        defaults={
            "user_id": int(user_id),
            "status": WorkspaceTeardown.Status.PENDING,
            "completed_at": None,
            "created_at": timezone.now(),
        },
    )
    # robust: the delete has committed whatever happens; if Redis or the broker is down
    # the row stays pending and the sweep dispatches it later.
    transaction.on_commit(partial(workspace_teardown_dispatch, project_id=project_id), robust=True)
    return row


def workspace_teardown_dispatch(*, project_id: uuid.UUID | str) -> bool:
    """Tombstone the project (its tasks are skipped from now on) and enqueue the
    teardown task on the maintenance queue. Returns False if nothing is owed."""
    from .tasks import teardown_workspace

    project_id = _as_uuid(project_id)
    row = WorkspaceTeardown.objects.filter(
        project_id=project_id, status=WorkspaceTeardown.Status.PENDING
    ).first()
    if row is None:
        return False
    get_worker_space_manager().remove(user_id=row.user_id, project_id=project_id)
    agent_bus().tombstone_project(project_id)
    teardown_workspace.apply_async(
        kwargs={"user_id": row.user_id, "project_id": str(project_id)}, queue=MAINTENANCE_QUEUE
    )
    WorkspaceTeardown.objects.filter(pk=row.pk).update(dispatched_at=timezone.now())
    return True


def workspace_teardown_run(*, user_id: int, project_id: uuid.UUID | str) -> dict[str, Any] | None:
    """Tear down a deleted project's workspace: retire its queue (purge, cancel
    consumers, leave the active set), delete every key under its prefix, let receivers
    drop what lives elsewhere (vector collections), forget it in the registry index.

    Idempotent; raises while a backend is down (the task retries with backoff). Returns
    None when nothing is owed (row gone, already done, or the project exists).
    """
    project_id = _as_uuid(project_id)
    row = WorkspaceTeardown.objects.filter(project_id=project_id).first()
    if row is None or row.status == WorkspaceTeardown.Status.DONE:
        return None
    if Project.objects.filter(id=project_id).exists():
        # Only a deleted project's workspace is torn down; the row is a mistake.
        logger.warning("teardown of %s skipped: the project exists", project_id)
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
    bus = agent_bus()
    # Wait out an initialisation in progress, so it cannot write keys after ours go.
    lock = space._init_lock()
    locked = lock.acquire()
    try:
        if space.redis.exists(registry.STATE_KEY):
            registry.mark_state(space.redis, State.CLEANING)
        bus.tombstone_project(project_id)
        purged = bus.retire_project(user_id=user_id, project_id=project_id)
        removed = space.redis.delete_all()  # the lock key goes with them
    finally:
        if locked:
            with suppress(LockError):
                lock.release()
    workspace_teardown.send(sender=UserWorkerSpace, user_id=user_id, project_id=project_id)
    registry.index_remove(user_id, project_id)
    return {"purged_tasks": purged, "removed_keys": removed}


# --- sweep -------------------------------------------------------------------------


# Orphan candidates and when a sweep first saw them (member "{user_id}:{project_hex}").
SUSPECTS_KEY = f"{KEY_NAMESPACE}:sweep:suspects"
# Owner of a project queue that nothing else names (no row, no prefix, no teardown).
UNKNOWN_OWNER = 0


def workspace_sweep(*, redispatch_after: float | None = None) -> dict[str, int]:
    """Periodic repair (Celery beat).

    1. Teardowns owed but not progressing for `redispatch_after` seconds (the process
       crashed between commit and dispatch, the broker was down) are dispatched again.
    2. Anything a workspace left in Redis with no project row behind it (registry index
       entries, keys under a workspace prefix, project queues) gets a teardown, once two
       sweeps at least `redispatch_after` seconds apart saw it orphaned: a project
       whose creating transaction has not committed yet is never taken for an orphan.
    """
    if redispatch_after is None:
        redispatch_after = settings.WORKSPACE_TEARDOWN_REDISPATCH_SECONDS
    cut = timezone.now() - timedelta(seconds=redispatch_after)
    owed = list(
        WorkspaceTeardown.objects.filter(status=WorkspaceTeardown.Status.PENDING)
        .annotate(activity=Coalesce("last_attempt_at", "dispatched_at", "created_at"))
        .filter(activity__lt=cut)
        .values_list("project_id", flat=True)
    )
    redispatched = sum(workspace_teardown_dispatch(project_id=p) for p in owed)

    candidates = workspace_leftovers()
    project_ids = {p for _, p in candidates}
    live = set(Project.objects.filter(id__in=project_ids).values_list("id", "owner_id"))
    pending = set(
        WorkspaceTeardown.objects.filter(
            project_id__in=project_ids, status=WorkspaceTeardown.Status.PENDING
        ).values_list("project_id", flat=True)
    )
    orphans = {
        registry.index_member(u, p)
        for u, p in candidates
        if (p, u) not in live and p not in pending
    }
    client = get_redis()
    seen = {m: float(t) for m, t in client.hgetall(SUSPECTS_KEY).items()}
    now = time.time()
    confirmed = sorted(m for m in orphans if m in seen and now - seen[m] >= redispatch_after)
    pipe = client.pipeline(transaction=False)
    for member in seen.keys() - orphans:
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
    }


def workspace_leftovers() -> set[tuple[int, uuid.UUID]]:
    """Every (user, project) that has something in Redis: registry index entries and
    key prefixes, plus project queues (owner from the project or teardown row, or
    UNKNOWN_OWNER).

    Scans the keyspace (incrementally): keys that escaped the index can only be found so.
    """
    found = set(registry.index_members())
    queued: set[uuid.UUID] = set()
    for key in get_redis().scan_iter(match=f"{KEY_NAMESPACE}*", count=1000):
        parsed = registry.parse_prefix(key)
        if parsed is not None:
            found.add(parsed)
            continue
        project_id = project_id_from_queue(key)
        if project_id is not None:
            queued.add(project_id)
    queued -= {p for _, p in found}
    if queued:
        owners = dict(Project.objects.filter(id__in=queued).values_list("id", "owner_id"))
        owners.update(
            WorkspaceTeardown.objects.filter(project_id__in=queued - owners.keys()).values_list(
                "project_id", "user_id"
            )
        )
        found.update((owners.get(p, UNKNOWN_OWNER), p) for p in queued)
    return found
