"""UserWorkerSpace: the backend resources of one (user, project), as one process sees them.

The shared part lives in Redis under the workspace prefix (registry entry, AgentCache);
the database is the source of truth for agents. The object itself is a small in-process
handle: identifiers, the registry generation it attached to, and when it was last used
here.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from typing import Any

import redis
from django.conf import settings
from redis.exceptions import LockError

from agentbus import project_gone
from projects.models import Project

from . import registry
from .cache import AgentCache
from .exceptions import WorkspaceGone, WorkspaceUnavailable
from .lifecycle import project_tombstone_heal
from .redis import ScopedRedis, scoped
from .registry import INIT_LOCK_KEY, State
from .sources import AgentConfig, agent_source

logger = logging.getLogger(__name__)

# How long a stopping process waits for the uses of a workspace that are in flight.
SHUTDOWN_WAIT_SECONDS = 5.0


def _unavailable(exc: Exception) -> WorkspaceUnavailable:
    return WorkspaceUnavailable(
        f"The project's workspace could not reach Redis ({type(exc).__name__}); retry shortly."
    )


class UserWorkerSpace:
    """One project's workspace. Get it through `get_worker_space`, not by constructing it:
    the manager guarantees one initialisation and the cached fast path."""

    __slots__ = (
        "user_id",
        "project_id",
        "key",
        "redis",
        "agent_cache",
        "agent_ids",
        "initialized_at",
        "init_count",
        "initialized_here",
        "last_used",
        "revalidate_at",
        "_state",
        "_in_flight",
        "_lock",
        "_idle",
    )

    def __init__(self, *, user_id: int, project_id: uuid.UUID | str):
        self.user_id = int(user_id)
        self.project_id = (
            project_id if isinstance(project_id, uuid.UUID) else uuid.UUID(str(project_id))
        )
        self.key = f"{self.user_id}_{self.project_id}"
        self.redis: ScopedRedis = scoped(self.user_id, self.project_id)
        self.agent_cache = AgentCache(self.redis, self.project_id)
        # The agent ids known at the last attach/refresh (`active_agents` in stats).
        self.agent_ids: frozenset[str] = frozenset()
        self.initialized_at: float | None = None
        # The registry generation this process attached to; a different one means the
        # workspace was initialised again elsewhere (after a reset or a Redis flush).
        self.init_count = 0
        self.initialized_here = False
        self.last_used = time.monotonic()
        self.revalidate_at = 0.0
        self._state = State.NOT_INITIALIZED
        self._in_flight = 0
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)

    def __repr__(self) -> str:
        return f"<UserWorkerSpace {self.key} {self.state}>"

    # --- state -----------------------------------------------------------------------

    @property
    def state(self) -> State:
        """This process's view: InUse while a dispatch or a run uses the workspace here."""
        if self._state is State.INITIALIZED and self._in_flight:
            return State.IN_USE
        return self._state

    @property
    def initialized(self) -> bool:
        return self._state is State.INITIALIZED

    @property
    def in_use(self) -> bool:
        return self._in_flight > 0

    @contextmanager
    def use(self) -> Iterator[UserWorkerSpace]:
        """Hold the workspace for one piece of work (Initialized -> InUse -> Initialized);
        a stopping process waits for these to end."""
        with self._lock:
            self._in_flight += 1
        try:
            yield self
        finally:
            with self._lock:
                self._in_flight = max(0, self._in_flight - 1)
                if not self._in_flight:
                    self._idle.notify_all()

    # --- lifecycle -------------------------------------------------------------------

    def initialize(self) -> None:
        """Bring the workspace to Initialized.

        If the registry says another thread or process already initialised it, attach to
        that. Otherwise initialise it under the workspace's Redis lock, so that across all
        processes exactly one loads the agents and fills the cache. Raises WorkspaceGone
        for a project that no longer exists, and WorkspaceUnavailable (503) when
        initialisation fails: the registry is left in the Error state and the next call
        retries.
        """
        try:
            entry = registry.read(self.redis, self.user_id, self.project_id)
            if entry.state is State.INITIALIZED:
                self._attach(entry)
                return
            self._initialize_locked()
        except (WorkspaceGone, WorkspaceUnavailable):
            raise
        except redis.RedisError as exc:
            self._state = State.ERROR
            raise _unavailable(exc) from exc

    def _init_lock(self):
        seconds = settings.WORKSPACE_INIT_LOCK_SECONDS
        # Not thread-local: the token must be visible to whichever thread releases it.
        return self.redis.lock(
            INIT_LOCK_KEY, timeout=seconds, sleep=0.01, blocking_timeout=seconds, thread_local=False
        )

    def _initialize_locked(self) -> None:
        lock = self._init_lock()
        if not lock.acquire():
            raise WorkspaceUnavailable(
                "The project's workspace is being initialised by another process; retry shortly."
            )
        try:
            entry = registry.read(self.redis, self.user_id, self.project_id)
            if entry.state is State.INITIALIZED:  # another process finished first
                self._attach(entry)
                return
            self._state = State.INITIALIZING
            try:
                self._check_project()
                registry.mark_initializing(self.redis, self.user_id, self.project_id)
                configs = agent_source().configs(project_id=self.project_id)
                self.agent_cache.fill(configs)
                initialized_at, init_count = registry.mark_initialized(self.redis)
            except WorkspaceGone:
                self._state = State.NOT_INITIALIZED
                raise
            except Exception as exc:
                self._state = State.ERROR
                logger.exception("workspace %s: initialisation failed", self.key)
                with suppress(redis.RedisError):
                    registry.mark_error(self.redis, f"{type(exc).__name__}: {exc}")
                raise WorkspaceUnavailable(
                    f"The project's workspace could not be initialised ({type(exc).__name__}); "
                    "retry shortly."
                ) from exc
            self.initialized_here = True
            self._attach(
                registry.RegistryEntry(
                    user_id=self.user_id,
                    project_id=self.project_id,
                    state=State.INITIALIZED,
                    initialized_at=initialized_at,
                    init_count=init_count,
                    agent_ids=[c["id"] for c in configs],
                )
            )
            logger.info(
                "workspace %s: initialised with %d agent(s) (generation %d)",
                self.key,
                len(configs),
                init_count,
            )
        finally:
            # Expired, or removed by a teardown: nothing left to release.
            with suppress(LockError):
                lock.release()

    def _check_project(self) -> None:
        if not Project.objects.filter(id=self.project_id, owner_id=self.user_id).exists():
            raise WorkspaceGone()
        if project_gone(self.project_id) and not project_tombstone_heal(project_id=self.project_id):
            raise WorkspaceGone()  # being deleted: its row goes in a moment

    def _attach(self, entry: registry.RegistryEntry) -> None:
        self.agent_ids = frozenset(entry.agent_ids)
        self.initialized_at = entry.initialized_at
        self.init_count = entry.init_count
        self.revalidate_at = time.monotonic() + settings.WORKSPACE_REVALIDATE_SECONDS
        self._state = State.INITIALIZED

    def revalidate(self) -> None:
        """Check the registry still holds this workspace as initialised (re-initialise if
        it was reset, flushed or failed elsewhere), that the AgentCache still matches the
        database, and report this process's last use."""
        now = time.monotonic()
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.hmget(registry.STATE_KEY, ["state", "init_count"])
            pipe.set(registry.LAST_USED_KEY, time.time() - (now - self.last_used), xx=True)
            pipe.hgetall(registry.AGENT_CACHE_KEY)
            (state, count), _, cached = pipe.execute()
            if state == State.INITIALIZED and int(count or 0) == self.init_count:
                self._resync_drifted_agents(cached)
        except redis.RedisError as exc:
            raise _unavailable(exc) from exc
        if state == State.INITIALIZED:
            if int(count or 0) != self.init_count:
                self.initialize()  # attaches to the new generation
            else:
                self.revalidate_at = now + settings.WORKSPACE_REVALIDATE_SECONDS
            return
        self._state = State.NOT_INITIALIZED
        self.initialize()

    def _resync_drifted_agents(self, cached: dict[str, str]) -> None:
        """Bring the AgentCache back in line with the database if an agent write missed it
        (Redis was down when the write committed, or the write bypassed the services).

        One cheap read (the agents' count and newest update) is compared with the cached
        configs; only on a difference are the configs read and the changed ones synced.
        """
        configs = {agent_id: json.loads(raw) for agent_id, raw in cached.items()}
        count, latest = agent_source().fingerprint(project_id=self.project_id)
        latest_cached = max(
            (datetime.fromisoformat(c["updated_at"]) for c in configs.values()), default=None
        )
        if count == len(configs) and latest == latest_cached:
            return
        current = {c["id"]: c for c in agent_source().configs(project_id=self.project_id)}
        logger.warning("workspace %s: AgentCache missed agent writes; resyncing", self.key)
        for agent_id in configs.keys() - current.keys():
            self.remove_agent(agent_id)
        for agent_id, config in current.items():
            if configs.get(agent_id) != config:
                self.add_agent(config)

    def reset(self) -> None:
        """Drop the shared AgentCache and mark the workspace NotInitialized: the next use
        (in any process) initialises it again from the database. Vector collections and
        queued tasks are kept."""
        lock = self._init_lock()
        if not lock.acquire():
            raise WorkspaceUnavailable("The workspace is being initialised; retry shortly.")
        try:
            self.agent_cache.clear()
            registry.mark_state(self.redis, State.NOT_INITIALIZED)
        finally:
            with suppress(LockError):
                lock.release()
        self.release()
        logger.info("workspace %s: reset", self.key)

    def release(self) -> None:
        """Forget the in-process handle (idle eviction); shared state is untouched."""
        self.agent_ids = frozenset()
        self.revalidate_at = 0.0
        self._state = State.NOT_INITIALIZED

    def cleanup(self, *, wait: float = SHUTDOWN_WAIT_SECONDS) -> None:
        """Release what this process holds for the workspace (process shutdown):
        Shutdown while the uses in flight here finish (at most `wait` seconds), then
        Cleaned. Never deletes shared state: other processes keep serving the workspace,
        and project deletion has its own teardown."""
        with self._lock:
            if self._state in (State.INITIALIZED, State.IN_USE):
                self._state = State.SHUTDOWN
                self._idle.wait_for(lambda: not self._in_flight, timeout=wait)
            self.agent_ids = frozenset()
            self.revalidate_at = 0.0
            self._state = State.CLEANED

    # --- agents ----------------------------------------------------------------------

    def get_agent(self, agent_id: uuid.UUID | str) -> AgentConfig | None:
        """The agent's config from the cache; a miss loads it from the database and
        refills the cache."""
        config = self.agent_cache.peek(agent_id)
        if config is not None:
            return config
        config = self.agent_cache.load(agent_id)
        if config is None:
            return None
        self.agent_cache.put(config)
        self.agent_ids = self.agent_ids | {config["id"]}
        return config

    def add_agent(self, config: AgentConfig) -> str:
        """Cache a new (or changed) agent's config."""
        agent_id = str(config["id"])
        self.agent_cache.put(config)  # refuses another project's agent
        self.agent_ids = self.agent_ids | {agent_id}
        return agent_id

    def remove_agent(self, agent_id: uuid.UUID | str) -> bool:
        """Forget a deleted agent; returns whether it was cached."""
        agent_id = str(agent_id)
        removed = self.agent_cache.remove(agent_id)
        self.agent_ids = self.agent_ids - {agent_id}
        return removed

    def stats(self) -> dict[str, Any]:
        """This process's view of the workspace, in the stats shape."""
        return {
            "user_id": self.user_id,
            "project_id": str(self.project_id),
            "state": str(self.state),
            "initialized": self.initialized,
            "active_agents": len(self.agent_ids),
            "agent_ids": sorted(self.agent_ids),
            "initialization_time": iso(self.initialized_at),
            "init_count": self.init_count,
            "in_use": self._in_flight,
        }


def iso(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, tz=UTC).isoformat()
