"""The workspace registry in Redis: each workspace's state, shared by every process.

Per workspace (under its prefix, through ScopedRedis):
- ``state``      hash: state, user_id, project_id, initialized_at, init_count, error,
                 error_at, changed_at
- ``last-used``  string: epoch seconds of the last use any process reported. Written
                 with SET XX, so a process reporting use after a teardown cannot bring a
                 removed workspace back.
- the agent ids are the keys of the AgentCache hash (``agents``, AGENT_CACHE_KEY): one
  source of truth, no read-modify-write of a list shared by processes.

Globally, ``uws:index`` is a set of "{user_id}:{project_hex}" so operators' views and
the sweep can list workspaces without scanning the keyspace.

Everything here can be rebuilt from the database: a flushed registry only means the
next request initialises the workspace again.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from common.redis import get_redis

from .redis import KEY_NAMESPACE, ScopedRedis, workspace_prefix

STATE_KEY = "state"
LAST_USED_KEY = "last-used"
INIT_LOCK_KEY = "init-lock"
AGENT_CACHE_KEY = "agents"  # the AgentCache hash (agent id -> config JSON)
# Global keys use the namespace but never the "uws:{int}:" shape of workspace prefixes.
INDEX_KEY = f"{KEY_NAMESPACE}:index"


class State(StrEnum):
    """The workspace state machine.

    Shared (in the registry): NotInitialized -> Initializing -> Initialized;
    Initializing -> Error -> Initializing (retry); Initialized -> Cleaning (project
    deleted) and the keys are then removed (Cleaned is recorded on the teardown row).
    In one process only (`UserWorkerSpace.state`, shown by the stats of that process):
    Initialized <-> InUse (a chat dispatch or an agent run is using it), and
    Initialized -> Shutdown (the process stops: it waits for the uses in flight) ->
    Cleaned (released).
    """

    NOT_INITIALIZED = "NotInitialized"
    INITIALIZING = "Initializing"
    INITIALIZED = "Initialized"
    IN_USE = "InUse"
    ERROR = "Error"
    CLEANING = "Cleaning"
    CLEANED = "Cleaned"
    SHUTDOWN = "Shutdown"


def index_member(user_id: int, project_id: uuid.UUID) -> str:
    return f"{int(user_id)}:{project_id.hex}"


def parse_index_member(member: str) -> tuple[int, uuid.UUID] | None:
    try:
        user, project = member.split(":", 1)
        return int(user), uuid.UUID(hex=project)
    except ValueError:
        return None


def parse_prefix(key: str) -> tuple[int, uuid.UUID] | None:
    """(user_id, project_id) of a full key under a workspace prefix, else None."""
    parts = key.split(":", 3)
    if len(parts) < 4 or parts[0] != KEY_NAMESPACE:
        return None
    try:
        user_id, project_id = int(parts[1]), uuid.UUID(hex=parts[2])
    except ValueError:
        return None
    if workspace_prefix(user_id, project_id) != ":".join(parts[:3]) + ":":
        return None
    return user_id, project_id


@dataclass
class RegistryEntry:
    user_id: int
    project_id: uuid.UUID
    state: State = State.NOT_INITIALIZED
    initialized_at: float | None = None
    last_used: float | None = None
    init_count: int = 0
    error: str = ""
    error_at: float | None = None
    changed_at: float | None = None
    agent_ids: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.user_id}_{self.project_id}"

    @property
    def exists(self) -> bool:
        return self.state is not State.NOT_INITIALIZED or self.init_count > 0


def _float(value: Any) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _entry(
    user_id: int, project_id: uuid.UUID, raw: dict, last_used: Any, agents: list
) -> RegistryEntry:
    try:
        state = State(raw.get("state", State.NOT_INITIALIZED))
    except ValueError:
        state = State.NOT_INITIALIZED
    return RegistryEntry(
        user_id=user_id,
        project_id=project_id,
        state=state,
        initialized_at=_float(raw.get("initialized_at")),
        last_used=_float(last_used),
        init_count=int(raw.get("init_count") or 0),
        error=raw.get("error", ""),
        error_at=_float(raw.get("error_at")),
        changed_at=_float(raw.get("changed_at")),
        agent_ids=sorted(agents or ()),
    )


def read(redis: ScopedRedis, user_id: int, project_id: uuid.UUID) -> RegistryEntry:
    """One workspace's registry entry (one round trip)."""
    pipe = redis.pipeline(transaction=False)
    pipe.hgetall(STATE_KEY)
    pipe.get(LAST_USED_KEY)
    pipe.hkeys(AGENT_CACHE_KEY)
    raw, last_used, agents = pipe.execute()
    return _entry(user_id, project_id, raw, last_used, agents)


def read_state(redis: ScopedRedis) -> tuple[State, int]:
    """Just (state, init_count): what the fast path's periodic revalidation needs."""
    state, count = redis.hmget(STATE_KEY, ["state", "init_count"])
    try:
        return State(state or State.NOT_INITIALIZED), int(count or 0)
    except ValueError:
        return State.NOT_INITIALIZED, int(count or 0)


def read_many(members: list[tuple[int, uuid.UUID]]) -> list[RegistryEntry]:
    """Registry entries of many workspaces in one pipelined round trip."""
    client = get_redis()
    pipe = client.pipeline(transaction=False)
    for user_id, project_id in members:
        scoped = ScopedRedis(pipe, workspace_prefix(user_id, project_id))
        scoped.hgetall(STATE_KEY)
        scoped.get(LAST_USED_KEY)
        scoped.hkeys(AGENT_CACHE_KEY)
    # One broken workspace (a key of the wrong type) must not hide the others.
    replies = pipe.execute(raise_on_error=False)
    entries = []
    for i, (user_id, project_id) in enumerate(members):
        raw, last_used, agents = replies[i * 3 : i * 3 + 3]
        failed = [r for r in (raw, last_used, agents) if isinstance(r, Exception)]
        entry = _entry(
            user_id,
            project_id,
            {} if isinstance(raw, Exception) else raw,
            None if isinstance(last_used, Exception) else last_used,
            [] if isinstance(agents, Exception) else agents,
        )
        if failed:
            entry.state = State.ERROR
            entry.error = f"registry unreadable: {failed[0]}"
        entries.append(entry)
    return entries


def mark_initializing(redis: ScopedRedis, user_id: int, project_id: uuid.UUID) -> None:
    redis.hset(
        STATE_KEY,
        mapping={
            "state": State.INITIALIZING,
            "user_id": int(user_id),
            "project_id": str(project_id),
            "changed_at": time.time(),
        },
    )
    get_redis().sadd(INDEX_KEY, index_member(user_id, project_id))


def mark_initialized(redis: ScopedRedis) -> tuple[float, int]:
    """Record a completed initialisation; returns (initialized_at, init_count)."""
    now = time.time()
    pipe = redis.pipeline(transaction=True)
    pipe.hset(
        STATE_KEY,
        mapping={"state": State.INITIALIZED, "initialized_at": now, "changed_at": now, "error": ""},
    )
    pipe.hincrby(STATE_KEY, "init_count", 1)
    pipe.set(LAST_USED_KEY, now)
    _, count, _ = pipe.execute()
    return now, int(count)


def mark_error(redis: ScopedRedis, error: str) -> None:
    now = time.time()
    redis.hset(
        STATE_KEY,
        mapping={"state": State.ERROR, "error": error[:500], "error_at": now, "changed_at": now},
    )


def mark_state(redis: ScopedRedis, state: State) -> None:
    redis.hset(STATE_KEY, mapping={"state": state, "changed_at": time.time()})


def index_remove(user_id: int, project_id: uuid.UUID) -> None:
    get_redis().srem(INDEX_KEY, index_member(user_id, project_id))


def index_members() -> list[tuple[int, uuid.UUID]]:
    """Every workspace the registry knows, sorted by (user, project)."""
    parsed = (parse_index_member(m) for m in get_redis().smembers(INDEX_KEY))
    return sorted(p for p in parsed if p is not None)
