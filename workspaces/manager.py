"""WorkerSpaceManager: this process's workspaces, and `get_worker_space`, the way every
per-project endpoint and worker task reaches its workspace.

The fast path is a dict lookup and two float comparisons: no lock, no Redis round trip.
Every WORKSPACE_REVALIDATE_SECONDS a workspace is checked against the registry (it may
have been reset or flushed elsewhere). Initialisation happens once across threads (a
striped per-key lock, double-checked) and across processes (the workspace's Redis lock,
see UserWorkerSpace.initialize).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from typing import Any

from django.conf import settings

from common.singletons import process_singleton

from .exceptions import WorkspaceGone
from .registry import State
from .space import SHUTDOWN_WAIT_SECONDS, UserWorkerSpace

logger = logging.getLogger(__name__)

# Per-key locks are striped: a bounded set of locks, whatever the number of projects.
_LOCK_STRIPES = 64


class WorkerSpaceManager:
    def __init__(self) -> None:
        self._spaces: dict[str, UserWorkerSpace] = {}
        self._key_locks = [threading.Lock() for _ in range(_LOCK_STRIPES)]
        self._lock = threading.Lock()  # eviction and cleanup_all
        self._next_eviction = 0.0
        self.pid = os.getpid()
        self.created = 0
        self.evicted = 0

    def get_or_create(self, *, user_id: int, project_id: uuid.UUID | str) -> UserWorkerSpace:
        """The initialised workspace of (user, project), created on first use."""
        if project_id.__class__ is not uuid.UUID:
            project_id = uuid.UUID(str(project_id))
        key = f"{user_id}_{project_id}"
        space = self._spaces.get(key)
        if space is not None and space._state is State.INITIALIZED:
            now = time.monotonic()
            if now < space.revalidate_at:
                space.last_used = now
                if now >= self._next_eviction:
                    self.evict_idle(now)
                return space
        return self._get_or_create_locked(key, int(user_id), project_id)

    def _get_or_create_locked(
        self, key: str, user_id: int, project_id: uuid.UUID
    ) -> UserWorkerSpace:
        with self._key_locks[hash(key) % _LOCK_STRIPES]:
            space = self._spaces.get(key)
            if space is None:
                space = UserWorkerSpace(user_id=user_id, project_id=project_id)
            try:
                if space._state is not State.INITIALIZED:
                    space.initialize()
                elif time.monotonic() >= space.revalidate_at:
                    space.revalidate()
            except WorkspaceGone:
                self._drop(key)
                raise
            now = time.monotonic()
            space.last_used = now
            if self._spaces.get(key) is not space:
                self._spaces[key] = space
                self.created += 1
                if len(self._spaces) > settings.WORKSPACE_MAX_IN_MEMORY:
                    self.evict_idle(now, force=True)
            return space

    def get(self, *, user_id: int, project_id: uuid.UUID | str) -> UserWorkerSpace | None:
        """The workspace if this process holds it, without creating it."""
        return self._spaces.get(f"{user_id}_{uuid.UUID(str(project_id))}")

    def remove(self, *, user_id: int, project_id: uuid.UUID | str) -> bool:
        """Release this process's handle on a workspace (shared state is the teardown's
        business, see workspaces.services)."""
        return self._drop(f"{user_id}_{uuid.UUID(str(project_id))}")

    def _drop(self, key: str) -> bool:
        space = self._spaces.pop(key, None)
        if space is None:
            return False
        space.cleanup()
        return True

    def evict_idle(self, now: float | None = None, *, force: bool = False) -> int:
        """Drop workspaces idle longer than WORKSPACE_IDLE_SECONDS, then the least
        recently used beyond WORKSPACE_MAX_IN_MEMORY. Only in-process state is released;
        a workspace in use by a request is kept."""
        if not self._lock.acquire(blocking=force):
            return 0  # another thread is evicting
        try:
            now = time.monotonic() if now is None else now
            idle = settings.WORKSPACE_IDLE_SECONDS
            cap = settings.WORKSPACE_MAX_IN_MEMORY
            self._next_eviction = now + max(0.05, min(idle / 2, 30.0))
            spaces = list(self._spaces.items())
            drop = {k for k, s in spaces if now - s.last_used > idle and not s.in_use}
            over = len(spaces) - len(drop) - cap
            if over > 0:
                lru = sorted((s.last_used, k) for k, s in spaces if k not in drop and not s.in_use)
                drop.update(k for _, k in lru[:over])
            for key in drop:
                space = self._spaces.pop(key, None)
                if space is not None:
                    space.release()
            self.evicted += len(drop)
            return len(drop)
        finally:
            self._lock.release()

    def cleanup_all(self, *, wait: float = SHUTDOWN_WAIT_SECONDS) -> None:
        """Release everything this process holds (shutdown), giving the uses in flight
        at most `wait` seconds in all. Shared state in Redis is left alone: other
        processes keep serving these workspaces."""
        with self._lock:
            spaces = list(self._spaces.values())
            self._spaces.clear()
        deadline = time.monotonic() + wait
        for space in spaces:
            space.cleanup(wait=max(0.0, deadline - time.monotonic()))
        if spaces:
            logger.info("workspaces: released %d workspace(s) on shutdown", len(spaces))

    def forget_all_unsafe(self) -> None:
        """Drop every in-memory workspace without any cleanup (tests): unsafe while
        requests still hold the handles."""
        self._spaces.clear()
        self._next_eviction = 0.0

    def spaces(self) -> list[UserWorkerSpace]:
        return list(self._spaces.values())

    def get_stats(self) -> dict[str, Any]:
        """This process's workspaces, in the stats shape of /admin/workspaces/stats."""
        spaces = list(self._spaces.values())
        return {
            "active_spaces": sum(1 for s in spaces if s.initialized),
            "spaces": {s.key: s.stats() for s in spaces},
            "process": {
                "pid": self.pid,
                "in_memory": len(spaces),
                "max_in_memory": settings.WORKSPACE_MAX_IN_MEMORY,
                "idle_seconds": settings.WORKSPACE_IDLE_SECONDS,
                "created": self.created,
                "evicted": self.evicted,
            },
        }


@process_singleton()
def get_worker_space_manager() -> WorkerSpaceManager:
    """The process's WorkerSpaceManager (a forked child starts with its own)."""
    return WorkerSpaceManager()


def get_worker_space(*, user_id: int, project_id: uuid.UUID | str) -> UserWorkerSpace:
    """The initialised workspace of the project: what every piece of work for a project
    goes through. Raises WorkspaceUnavailable (503) if it cannot be initialised,
    WorkspaceGone (404) if the project no longer exists."""
    return get_worker_space_manager().get_or_create(user_id=user_id, project_id=project_id)
