"""The workspace registry in Redis: each workspace's state, shared by every process.

Per workspace (under its prefix, through ScopedRedis):
- ``state``      hash: state, user_id, project_id, initialized_at, init_count, error,
                 error_at, changed_at
- ``last-used``  string: epoch seconds of the last use any process reported. Written
                 with SET XX, so a process reporting use after a teardown cannot bring a
                 removed workspace back.
- the agent ids are the keys of the AgentCache hash (``agents``, AGENT_CACHE_KEY): one
  source of truth, no read-modify-write of a list shared by processes.

Globally (so operators' views and the sweep never scan the keyspace or read every
workspace):
- ``uws:registry``  sorted set of index members "{user_id:012d}:{project_hex}", all at
                    score 0: in (user, project) order, so a page is one ZRANGE and the
                    sweep resumes after a member (ZRANGE BYLEX) wherever it stopped.
- ``uws:state:{State}``  one sorted set per state, member -> when it entered the state:
                    counts by state are a ZCARD each, failed and stuck initialisations
                    a range. Every state change moves the member in the same
                    transaction as it writes the ``state`` hash.

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
INDEX_KEY = f"{KEY_NAMESPACE}:registry"
# The index of earlier versions (a set of "{user_id}:{project_hex}"); the sweep moves
# what it holds into INDEX_KEY.
LEGACY_INDEX_KEY = f"{KEY_NAMESPACE}:index"
STATE_INDEX_PREFIX = f"{KEY_NAMESPACE}:state:"
# Orphan candidates and when a sweep first saw them (index members).
SUSPECTS_KEY = f"{KEY_NAMESPACE}:sweep:suspects"
# Where the sweep's walk of the index and of the keyspace stopped.
SWEEP_CURSOR_KEY = f"{KEY_NAMESPACE}:sweep:cursor"


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
    """The workspace's member in the index: zero-padded, so members sort by user."""
    return f"{int(user_id):012d}:{uuid.UUID(str(project_id)).hex}"


def state_key(state: State) -> str:
    return f"{STATE_INDEX_PREFIX}{state}"


def _member_of(redis: ScopedRedis) -> str:
    parsed = parse_prefix(redis.prefix + STATE_KEY)
    if parsed is None:
        raise ValueError(f"{redis.prefix!r} is not a workspace prefix")
    return index_member(*parsed)


def _enter_state(pipe: Any, member: str, state: State, now: float) -> None:
    """Queue the moves of `member` into `state`'s set and out of every other."""
    for other in State:
        if other is not state:
            pipe.zrem(state_key(other), member)
    pipe.zadd(state_key(state), {member: now})


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
    now, member = time.time(), index_member(user_id, project_id)
    pipe = get_redis().pipeline(transaction=True)
    pipe.hset(
        redis.key(STATE_KEY),
        mapping={
            "state": State.INITIALIZING,
            "user_id": int(user_id),
            "project_id": str(project_id),
            "changed_at": now,
        },
    )
    _enter_state(pipe, member, State.INITIALIZING, now)
    pipe.zadd(INDEX_KEY, {member: 0})
    pipe.execute()


def mark_initialized(redis: ScopedRedis) -> tuple[float, int]:
    """Record a completed initialisation; returns (initialized_at, init_count)."""
    now = time.time()
    pipe = get_redis().pipeline(transaction=True)
    pipe.hset(
        redis.key(STATE_KEY),
        mapping={"state": State.INITIALIZED, "initialized_at": now, "changed_at": now, "error": ""},
    )
    pipe.hincrby(redis.key(STATE_KEY), "init_count", 1)
    pipe.set(redis.key(LAST_USED_KEY), now)
    _enter_state(pipe, _member_of(redis), State.INITIALIZED, now)
    count = pipe.execute()[1]
    return now, int(count)


def mark_error(redis: ScopedRedis, error: str) -> None:
    now = time.time()
    pipe = get_redis().pipeline(transaction=True)
    pipe.hset(
        redis.key(STATE_KEY),
        mapping={"state": State.ERROR, "error": error[:500], "error_at": now, "changed_at": now},
    )
    _enter_state(pipe, _member_of(redis), State.ERROR, now)
    pipe.execute()


def mark_state(redis: ScopedRedis, state: State) -> None:
    now = time.time()
    pipe = get_redis().pipeline(transaction=True)
    pipe.hset(redis.key(STATE_KEY), mapping={"state": state, "changed_at": now})
    _enter_state(pipe, _member_of(redis), state, now)
    pipe.execute()


def index_add(user_id: int, project_id: uuid.UUID) -> None:
    get_redis().zadd(INDEX_KEY, {index_member(user_id, project_id): 0})


def index_remove(user_id: int, project_id: uuid.UUID) -> None:
    member = index_member(user_id, project_id)
    pipe = get_redis().pipeline(transaction=True)
    pipe.zrem(INDEX_KEY, member)
    for state in State:
        pipe.zrem(state_key(state), member)
    pipe.execute()


def index_size() -> int:
    return int(get_redis().zcard(INDEX_KEY))


def index_page(*, offset: int, limit: int) -> list[tuple[int, uuid.UUID]]:
    """A page of the index in (user, project) order: one ZRANGE, whatever its size."""
    if limit <= 0:
        return []
    members = get_redis().zrange(INDEX_KEY, offset, offset + limit - 1)
    return [p for p in map(parse_index_member, members) if p is not None]


def index_ranks(members: list[tuple[int, uuid.UUID]]) -> list[int | None]:
    """Each workspace's position in the index (None if it is not there)."""
    pipe = get_redis().pipeline(transaction=False)
    for user_id, project_id in members:
        pipe.zrank(INDEX_KEY, index_member(user_id, project_id))
    return pipe.execute() if members else []


def index_after(member: str, *, limit: int) -> list[str]:
    """Up to `limit` index members after `member` ("" for the first)."""
    start = f"({member}" if member else "-"
    return list(get_redis().zrangebylex(INDEX_KEY, start, "+", start=0, num=limit))


def state_counts() -> tuple[int, dict[str, int]]:
    """(workspaces in the index, how many are in each state): one round trip."""
    pipe = get_redis().pipeline(transaction=False)
    pipe.zcard(INDEX_KEY)
    for state in State:
        pipe.zcard(state_key(state))
    total, *counts = pipe.execute()
    return int(total), {str(state): int(n) for state, n in zip(State, counts, strict=True)}


def state_members(
    state: State, *, entered_before: float | None = None
) -> list[tuple[int, uuid.UUID]]:
    """Workspaces in a state (those that entered it before a time), oldest first."""
    high = "+inf" if entered_before is None else f"({entered_before}"
    members = get_redis().zrangebyscore(state_key(state), "-inf", high)
    return [p for p in map(parse_index_member, members) if p is not None]


def state_reconcile(members: list[str]) -> int:
    """Put these workspaces in the state set their registry entry says (after a Redis
    restore, or entries from before the state sets); returns how many moved."""
    if not members:
        return 0
    client = get_redis()
    pipe = client.pipeline(transaction=False)
    for member in members:
        user_id, project_id = parse_index_member(member) or (0, uuid.UUID(int=0))
        pipe.hmget(workspace_prefix(user_id, project_id) + STATE_KEY, ["state", "changed_at"])
    recorded = pipe.execute()
    pipe = client.pipeline(transaction=False)
    for member, (state, _) in zip(members, recorded, strict=True):
        pipe.zscore(state_key(_state_of(state)), member)
    present = pipe.execute()
    moved = 0
    pipe = client.pipeline(transaction=True)
    for member, (state, changed_at), score in zip(members, recorded, present, strict=True):
        # No entry (a teardown between its two steps, say): nothing to say where it is.
        if score is None and state is not None:
            _enter_state(pipe, member, _state_of(state), _float(changed_at) or time.time())
            moved += 1
    if moved:
        pipe.execute()
    return moved


def _state_of(raw: Any) -> State:
    try:
        return State(raw or State.NOT_INITIALIZED)
    except ValueError:
        return State.NOT_INITIALIZED


def index_members() -> list[tuple[int, uuid.UUID]]:
    """Every workspace the registry knows, sorted by (user, project). Reads the whole
    index: for tests and benchmarks; operators' views take `index_page`."""
    parsed = (parse_index_member(m) for m in get_redis().zrange(INDEX_KEY, 0, -1))
    return [p for p in parsed if p is not None]
