"""UserWorkerSpace: the backend resources of one (user, project), as one process sees them.

The shared part lives in Redis under the workspace prefix (registry entry, AgentCache,
the AgentBus's agent registrations); the database is the source of truth for agents.
The object itself is a small in-process handle: identifiers, the registry generation
it attached to, and when it was last used here.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import datetime
from typing import Any

import redis
from django.conf import settings
from redis.exceptions import LockError

from . import registry
from .cache import AgentCache
from .exceptions import WorkspaceGone, WorkspaceUnavailable
from .redis import ScopedRedis, scoped
from .registry import INIT_LOCK_KEY, State
from .signals import agent_deregistered, agents_registered

logger = logging.getLogger(__name__)


def agent_bus():
    """The process's AgentBus."""
    from .bus import get_agent_bus

    return get_agent_bus()


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
    )

    def __init__(self, *, user_id: int, project_id: uuid.UUID | str):
        self.user_id = int(user_id)
        self.project_id = (
            project_id if isinstance(project_id, uuid.UUID) else uuid.UUID(str(project_id))
        )
        self.key = f"{self.user_id}_{self.project_id}"
        self.redis: ScopedRedis = scoped(self.user_id, self.project_id)
        self.agent_cache = AgentCache(self.redis, self.project_id)
        # The agent ids known at the last attach/refresh (the seed's active_agents).
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

    def __repr__(self) -> str:
        return f"<UserWorkerSpace {self.key} {self.state}>"

    # --- state -----------------------------------------------------------------------

    @property
    def state(self) -> State:
        """This process's view: InUse while it serves a request with the workspace."""
        if self._state is State.INITIALIZED and self._in_flight:
            return State.IN_USE
        return self._state

    @property
    def initialized(self) -> bool:
        return self._state is State.INITIALIZED

    @property
    def in_use(self) -> bool:
        return self._in_flight > 0

    def enter(self) -> None:
        """Mark the workspace in use by one more request (Initialized -> InUse)."""
        with self._lock:
            self._in_flight += 1

    def leave(self) -> None:
        """The request is answered (InUse -> Initialized once none is left)."""
        with self._lock:
            self._in_flight = max(0, self._in_flight - 1)

    @contextmanager
    def use(self) -> Iterator[UserWorkerSpace]:
        self.enter()
        try:
            yield self
        finally:
            self.leave()

    # --- lifecycle -------------------------------------------------------------------

    def initialize(self) -> None:
        """Bring the workspace to Initialized.

        If the registry says another thread or process already initialised it, attach to
        that. Otherwise initialise it under the workspace's Redis lock, so that across all
        processes exactly one loads the agents, fills the cache and registers them on the
        bus. Raises WorkspaceGone for a project that no longer exists, and
        WorkspaceUnavailable (503) when initialisation fails: the registry is left in the
        Error state and the next call retries.
        """
        try:
            entry = registry.read(self.redis, self.user_id, self.project_id)
            if entry.state is State.INITIALIZED:
                self._attach(entry)
                return
            registered = self._initialize_locked()
        except (WorkspaceGone, WorkspaceUnavailable):
            raise
        except redis.RedisError as exc:
            self._state = State.ERROR
            raise WorkspaceUnavailable(
                f"The project's workspace could not reach Redis ({type(exc).__name__}); "
                "retry shortly."
            ) from exc
        if registered:
            self._announce(agents_registered, agent_ids=registered)

    def _announce(self, signal, **kwargs: Any) -> None:
        """Tell other apps (the agents app publishes collection work). The workspace
        change has happened either way: a failing receiver is logged, not raised."""
        for receiver, result in signal.send_robust(
            sender=UserWorkerSpace, user_id=self.user_id, project_id=self.project_id, **kwargs
        ):
            if isinstance(result, Exception):
                logger.error(
                    "workspace %s: receiver %r failed",
                    self.key,
                    receiver,
                    exc_info=(type(result), result, result.__traceback__),
                )

    def _init_lock(self):
        seconds = settings.WORKSPACE_INIT_LOCK_SECONDS
        # Not thread-local: the token must be visible to whichever thread releases it.
        return self.redis.lock(
            INIT_LOCK_KEY, timeout=seconds, sleep=0.01, blocking_timeout=seconds, thread_local=False
        )

    def _initialize_locked(self) -> list[str]:
        lock = self._init_lock()
        if not lock.acquire():
            raise WorkspaceUnavailable(
                "The project's workspace is being initialised by another process; retry shortly."
            )
        try:
            entry = registry.read(self.redis, self.user_id, self.project_id)
            if entry.state is State.INITIALIZED:  # another process finished first
                self._attach(entry)
                return []
            self._state = State.INITIALIZING
            try:
                self._check_project()
                registry.mark_initializing(self.redis, self.user_id, self.project_id)
                agent_ids = self._load_and_register()
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
                    agent_ids=agent_ids,
                )
            )
            logger.info(
                "workspace %s: initialised with %d agent(s) (generation %d)",
                self.key,
                len(agent_ids),
                init_count,
            )
            return agent_ids
        finally:
            # Expired, or removed by a teardown: nothing left to release.
            with suppress(LockError):
                lock.release()

    def _check_project(self) -> None:
        from projects.models import Project

        if not Project.objects.filter(id=self.project_id, owner_id=self.user_id).exists():
            raise WorkspaceGone()
        if agent_bus().is_tombstoned(self.project_id):
            raise WorkspaceGone()

    def _load_and_register(self) -> list[str]:
        from agents.selectors import agent_configs_for_project

        configs = agent_configs_for_project(project_id=self.project_id)
        self.agent_cache.fill(configs)
        agent_ids = [c["id"] for c in configs]
        bus = agent_bus()
        ids = dict(user_id=self.user_id, project_id=self.project_id)
        # Registrations left from before a reset or a lost initialisation.
        for stale in bus.registered_agents(**ids) - set(agent_ids):
            bus.deregister_agent(**ids, agent_id=stale)
        for agent_id in agent_ids:
            bus.register_agent(**ids, agent_id=agent_id)
        return agent_ids

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
            pipe.hgetall(registry.AGENTS_KEY)
            (state, count), _, cached = pipe.execute()
            if state == State.INITIALIZED and int(count or 0) == self.init_count:
                self._resync_drifted_agents(cached)
        except redis.RedisError as exc:
            raise WorkspaceUnavailable(
                f"The project's workspace could not reach Redis ({type(exc).__name__}); "
                "retry shortly."
            ) from exc
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

        One indexed aggregate compares the agents' count and newest update with the cached
        configs; only on a difference are the configs read and the changed agents synced.
        """
        from django.db.models import Count, Max

        from agents.models import Agent
        from agents.selectors import agent_configs_for_project

        configs = {agent_id: json.loads(raw) for agent_id, raw in cached.items()}
        db = Agent.objects.filter(project_id=self.project_id).aggregate(
            n=Count("id"), latest=Max("updated_at")
        )
        latest_cached = max(
            (datetime.fromisoformat(c["updated_at"]) for c in configs.values()), default=None
        )
        if db["n"] == len(configs) and db["latest"] == latest_cached:
            return
        current = {c["id"]: c for c in agent_configs_for_project(project_id=self.project_id)}
        logger.warning("workspace %s: AgentCache missed agent writes; resyncing", self.key)
        for agent_id in configs.keys() - current.keys():
            self.remove_agent(agent_id)
        for agent_id, config in current.items():
            if agent_id not in configs:
                self.add_agent(config)
            elif configs[agent_id] != config:
                self.agent_cache.put(config)

    def reset(self) -> None:
        """Drop the shared cache and bus registrations and mark the workspace
        NotInitialized: the next request (in any process) initialises it again from the
        database. Vector collections and queued tasks are kept."""
        lock = self._init_lock()
        if not lock.acquire():
            raise WorkspaceUnavailable("The workspace is being initialised; retry shortly.")
        try:
            bus = agent_bus()
            ids = dict(user_id=self.user_id, project_id=self.project_id)
            for agent_id in bus.registered_agents(**ids) | self.agent_cache.ids():
                bus.deregister_agent(**ids, agent_id=agent_id)
            self.agent_cache.clear()
            registry.mark_state(self.redis, State.NOT_INITIALIZED)
        finally:
            with suppress(LockError):
                lock.release()
        self.agent_ids = frozenset()
        self.revalidate_at = 0.0
        self._state = State.NOT_INITIALIZED
        logger.info("workspace %s: reset", self.key)

    def release(self) -> None:
        """Forget the in-process handle (idle eviction); shared state is untouched."""
        self.agent_ids = frozenset()
        self.revalidate_at = 0.0
        self._state = State.NOT_INITIALIZED

    def cleanup(self) -> None:
        """Release what this process holds for the workspace (process shutdown:
        Initialized -> Shutdown -> Cleaned). Never deletes shared state: other processes
        keep serving the workspace, and project deletion has its own teardown."""
        if self._state in (State.INITIALIZED, State.IN_USE):
            self._state = State.SHUTDOWN
        self.agent_ids = frozenset()
        self.revalidate_at = 0.0
        self._state = State.CLEANED

    # --- agents ----------------------------------------------------------------------

    def get_agent(self, agent_id: uuid.UUID | str) -> dict[str, Any] | None:
        """The agent's config from the cache; a miss loads it from the database, refills
        the cache and makes sure the agent is registered on the bus."""
        config = self.agent_cache.peek(agent_id)
        if config is not None:
            return config
        config = self.agent_cache.load(agent_id)
        if config is None:
            return None
        self.agent_cache.put(config)
        agent_bus().register_agent(
            user_id=self.user_id, project_id=self.project_id, agent_id=config["id"]
        )
        self.agent_ids = self.agent_ids | {config["id"]}
        return config

    def add_agent(self, config: dict[str, Any]) -> str:
        """Cache a new (or changed) agent's config and register it on the bus."""
        agent_id = str(config["id"])
        self.agent_cache.put(config)  # refuses another project's agent
        agent_bus().register_agent(
            user_id=self.user_id, project_id=self.project_id, agent_id=agent_id
        )
        self.agent_ids = self.agent_ids | {agent_id}
        self._announce(agents_registered, agent_ids=[agent_id])
        return agent_id

    def remove_agent(self, agent_id: uuid.UUID | str) -> bool:
        """Forget a deleted agent: cache entry, bus registration, then its collection
        (through agent_deregistered). Returns whether it was cached."""
        agent_id = str(agent_id)
        removed = self.agent_cache.remove(agent_id)
        agent_bus().deregister_agent(
            user_id=self.user_id, project_id=self.project_id, agent_id=agent_id
        )
        self.agent_ids = self.agent_ids - {agent_id}
        self._announce(agent_deregistered, agent_id=agent_id)
        return removed

    def stats(self) -> dict[str, Any]:
        """This process's view of the workspace, in the seed's stats shape."""
        return {
            "user_id": self.user_id,
            "project_id": str(self.project_id),
            "state": str(self.state),
            "initialized": self.initialized,
            "active_agents": len(self.agent_ids),
            "agent_ids": sorted(self.agent_ids),
            "initialization_time": _iso(self.initialized_at),
            "init_count": self.init_count,
            "in_use": self._in_flight,
        }


def _iso(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    from datetime import UTC, datetime

    return datetime.fromtimestamp(epoch, tz=UTC).isoformat()
