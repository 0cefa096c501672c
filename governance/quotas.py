"""Quotas: checked when a message is accepted, before its run can call a provider.

Counters live in Redis, per scope (the project, and its owner across all their
projects), under `gov:{p|u}:{id}:`:

- `tok:d:{YYYYMMDD}` and `tok:m:{YYYYMM}`: tokens recorded for runs accepted that day
  and month (UTC);
- `msg:{minute}`: messages accepted in that minute;
- `runs`: the runs in flight (a sorted set of run ids, scored by acceptance time);
- `synced`: present while the counters above are known to match the database.

The database is the truth (`RunUsage`: one row per run, written with the message).
Whenever `synced` is missing (Redis flushed or restarted, a new day, or every
QUOTA_RESYNC_SECONDS) the next admission rebuilds the counters from it first, so
losing Redis loses no accounting.

Admission is one Lua script over both scopes, so concurrent messages cannot both pass
a check that only one of them may: a run in flight holds QUOTA_RUN_RESERVE_TOKENS of
the token budgets until it is recorded and ends. A run is admitted while
`used + in_flight * reserve < limit`: a budget is overshot by at most the run admitted
last (as long as a run costs no more than the reserve).

Known gap, by design: a run recorded in the moment between a rebuild's database read
and its write to Redis is missing from the counters until the next rebuild (at most
QUOTA_RESYNC_SECONDS later).
"""

from __future__ import annotations

import calendar
import logging
import uuid
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

import redis
from django.conf import settings
from django.db.models import Q, Sum
from django.utils import timezone

from common.redis import get_redis

from .models import Quota, RunUsage

logger = logging.getLogger(__name__)

NO_LIMIT = -1
KEYS_PER_SCOPE = 5

# KEYS per scope: tok:d, tok:m, msg:{minute}, runs, synced.
# ARGV: now, run_id, reserve, stale_before, msg_ttl, runs_ttl, then per scope the four
# limits (tokens_per_day, tokens_per_month, messages_per_minute, concurrent_runs).
# Returns {0} when admitted; {1, scope} when a scope must be rebuilt first;
# {2, scope, limit index, used} when refused.
ADMIT = """
local scopes = #KEYS / 5
local now, run_id, reserve = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local stale_before, msg_ttl, runs_ttl = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
for s = 0, scopes - 1 do
  if redis.call('EXISTS', KEYS[s * 5 + 5]) == 0 then return {1, s} end
end
for s = 0, scopes - 1 do
  local k = s * 5
  redis.call('ZREMRANGEBYSCORE', KEYS[k + 4], '-inf', stale_before)
  local flight = redis.call('ZCARD', KEYS[k + 4])
  local used = {
    tonumber(redis.call('GET', KEYS[k + 1]) or '0') + flight * reserve,
    tonumber(redis.call('GET', KEYS[k + 2]) or '0') + flight * reserve,
    tonumber(redis.call('GET', KEYS[k + 3]) or '0'),
    flight,
  }
  for i = 1, 4 do
    local limit = tonumber(ARGV[6 + s * 4 + i])
    if limit >= 0 and used[i] >= limit then return {2, s, i, used[i]} end
  end
end
for s = 0, scopes - 1 do
  local k = s * 5
  redis.call('INCR', KEYS[k + 3])
  redis.call('EXPIRE', KEYS[k + 3], msg_ttl)
  redis.call('ZADD', KEYS[k + 4], now, run_id)
  redis.call('EXPIRE', KEYS[k + 4], runs_ttl)
end
return {0}
"""

# KEYS: tok:d, tok:m, msg:{minute}, runs, synced. ARGV: day, month, messages, ttl
# (synced), counters' ttl, then the in-flight run ids and their scores (id, score...).
# Writes only if no other rebuild got there first.
REBUILD = """
if redis.call('EXISTS', KEYS[5]) == 1 then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[5])
redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[5])
redis.call('SET', KEYS[3], ARGV[3], 'EX', 120)
redis.call('DEL', KEYS[4])
for i = 6, #ARGV, 2 do redis.call('ZADD', KEYS[4], ARGV[i + 1], ARGV[i]) end
redis.call('EXPIRE', KEYS[4], ARGV[5])
redis.call('SET', KEYS[5], '1', 'EX', ARGV[4])
return 1
"""

# KEYS: tok:d, tok:m, synced. ARGV: tokens. Counted only while the counters are synced:
# otherwise the next rebuild reads the tokens from the database.
CHARGE = """
if redis.call('EXISTS', KEYS[3]) == 0 then return 0 end
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('INCRBY', KEYS[1], ARGV[1]) end
if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('INCRBY', KEYS[2], ARGV[1]) end
return 1
"""


@dataclass(frozen=True)
class Scope:
    kind: str  # "project" or "user"
    id: str

    @property
    def prefix(self) -> str:
        return f"gov:{self.kind[0]}:{self.id}:"

    def keys(self, now: datetime) -> list[str]:
        minute = int(now.timestamp()) // 60
        return [
            f"{self.prefix}tok:d:{now:%Y%m%d}",
            f"{self.prefix}tok:m:{now:%Y%m}",
            f"{self.prefix}msg:{minute}",
            f"{self.prefix}runs",
            f"{self.prefix}synced:{now:%Y%m%d}",
        ]

    def rows(self):
        field = "project_id" if self.kind == "project" else "user_id"
        return RunUsage.objects.filter(**{field: self.id})


def _scopes(*, project_id, user_id) -> list[Scope]:
    return [Scope("project", uuid.UUID(str(project_id)).hex), Scope("user", str(user_id))]


@dataclass(frozen=True)
class Refusal:
    scope: str  # project or user
    limit: str  # one of Quota.LIMITS
    limit_value: int
    used: int
    resets_at: datetime | None  # None: when a run in flight ends

    @property
    def retry_after(self) -> int:
        if self.resets_at is None:
            return 5
        return max(1, int((self.resets_at - timezone.now()).total_seconds()) + 1)

    @property
    def detail(self) -> str:
        when = (
            f"resets at {self.resets_at.isoformat()}"
            if self.resets_at
            else "frees up when a run in flight ends"
        )
        return (
            f"The {self.scope} quota {self.limit} is reached ({self.used} of "
            f"{self.limit_value}); it {when}."
        )


def resets_at(limit: str, now: datetime) -> datetime | None:
    now = now.astimezone(UTC)
    if limit == "tokens_per_day":
        return datetime(now.year, now.month, now.day, tzinfo=UTC) + timedelta(days=1)
    if limit == "tokens_per_month":
        days = calendar.monthrange(now.year, now.month)[1]
        return datetime(now.year, now.month, 1, tzinfo=UTC) + timedelta(days=days)
    if limit == "messages_per_minute":
        return now.replace(second=0, microsecond=0) + timedelta(minutes=1)
    return None


def quotas_for(*, project_id, user_id) -> dict[str, Quota | None]:
    """The project's and the user's quotas (None where an operator set none)."""
    found = {"project": None, "user": None}
    for quota in Quota.objects.filter(Q(project_id=project_id) | Q(user_id=user_id)):
        found["project" if quota.project_id else "user"] = quota
    return found


def _limits(quota: Quota | None) -> list[int]:
    return [
        NO_LIMIT if quota is None or getattr(quota, name) is None else getattr(quota, name)
        for name in Quota.LIMITS
    ]


def scope_state(scope: Scope, now: datetime) -> dict:
    """The counters of a scope as the database has them."""
    rows = scope.rows()
    today = now.date()
    month_start = today.replace(day=1)
    sums = rows.filter(day__gte=month_start).aggregate(
        month=Sum("total_tokens"), day=Sum("total_tokens", filter=Q(day=today))
    )
    minute_start = now.replace(second=0, microsecond=0)
    return {
        "tokens_per_day": sums["day"] or 0,
        "tokens_per_month": sums["month"] or 0,
        "messages_per_minute": rows.filter(created_at__gte=minute_start).count(),
        "in_flight": list(
            rows.filter(finished_at__isnull=True).values_list("run_id", "created_at")
        ),
    }


def _rebuild(client: redis.Redis, scope: Scope, now: datetime) -> None:
    state = scope_state(scope, now)
    runs: list = []
    for run_id, created_at in state["in_flight"]:
        runs += [str(run_id), created_at.timestamp()]
    client.eval(
        REBUILD,
        KEYS_PER_SCOPE,
        *scope.keys(now),
        state["tokens_per_day"],
        state["tokens_per_month"],
        state["messages_per_minute"],
        int(settings.QUOTA_RESYNC_SECONDS),
        40 * 86400,
        *runs,
    )


def quota_admit(*, project_id, user_id, run_id) -> Refusal | None:
    """Admit run `run_id` against the project's and the user's quotas: None when
    admitted (it now counts as in flight), or the first limit it would exceed. Release
    it with `quota_release` if it is not stored after all.

    With Redis down the quotas are checked against the database (without the race
    guarantee), and nothing is checked when no quota applies."""
    now = timezone.now()
    quotas = quotas_for(project_id=project_id, user_id=user_id)
    scopes = _scopes(project_id=project_id, user_id=user_id)
    try:
        return _admit(get_redis(), scopes, [quotas["project"], quotas["user"]], str(run_id), now)
    except redis.RedisError as exc:
        if quotas["project"] is None and quotas["user"] is None:
            return None
        logger.warning("quotas checked against the database, Redis unavailable: %r", exc)
        return _admit_from_database(scopes, [quotas["project"], quotas["user"]], now)


def _admit(client, scopes, quotas, run_id, now) -> Refusal | None:
    keys = [key for scope in scopes for key in scope.keys(now)]
    limits = [value for quota in quotas for value in _limits(quota)]
    stale_before = now.timestamp() - settings.QUOTA_RUN_STALE_SECONDS
    for _ in range(3):
        answer = client.eval(
            ADMIT,
            len(keys),
            *keys,
            now.timestamp(),
            run_id,
            settings.QUOTA_RUN_RESERVE_TOKENS,
            stale_before,
            120,
            int(settings.QUOTA_RUN_STALE_SECONDS),
            *limits,
        )
        if answer[0] == 0:
            return None
        if answer[0] == 1:
            _rebuild(client, scopes[answer[1]], now)
            continue
        _, scope_index, limit_index, used = answer
        limit = Quota.LIMITS[limit_index - 1]
        return Refusal(
            scope=scopes[scope_index].kind,
            limit=limit,
            limit_value=limits[scope_index * 4 + limit_index - 1],
            used=int(used),
            resets_at=resets_at(limit, now),
        )
    raise redis.RedisError("quota counters kept disappearing while being rebuilt")


def _admit_from_database(scopes, quotas, now) -> Refusal | None:
    reserve = settings.QUOTA_RUN_RESERVE_TOKENS
    for scope, quota in zip(scopes, quotas, strict=True):
        if quota is None:
            continue
        state = scope_state(scope, now)
        flight = len(state["in_flight"])
        used = {
            "tokens_per_day": state["tokens_per_day"] + flight * reserve,
            "tokens_per_month": state["tokens_per_month"] + flight * reserve,
            "messages_per_minute": state["messages_per_minute"],
            "concurrent_runs": flight,
        }
        for name in Quota.LIMITS:
            limit = getattr(quota, name)
            if limit is not None and used[name] >= limit:
                return Refusal(scope.kind, name, limit, used[name], resets_at(name, now))
    return None


def quota_release(*, project_id, user_id, run_id) -> None:
    """The run no longer counts as in flight (it ended, or was never stored)."""
    try:
        pipe = get_redis().pipeline(transaction=False)
        for scope in _scopes(project_id=project_id, user_id=user_id):
            pipe.zrem(f"{scope.prefix}runs", str(run_id))
        pipe.execute()
    except redis.RedisError as exc:
        # The rebuild from the database (rows of ended runs are finished) catches up.
        logger.warning("run %s not released from quota counters: %r", run_id, exc)


def quota_charge(*, project_id, user_id, day: date, tokens: int) -> None:
    """Add a run's recorded tokens to the counters of the day it was accepted."""
    if tokens <= 0:
        return
    moment = datetime(day.year, day.month, day.day, tzinfo=UTC)
    try:
        client = get_redis()
        now = timezone.now()
        for scope in _scopes(project_id=project_id, user_id=user_id):
            day_key, month_key = scope.keys(moment)[:2]
            client.eval(CHARGE, 3, day_key, month_key, scope.keys(now)[4], tokens)
    except redis.RedisError as exc:
        logger.warning("tokens not added to quota counters (rebuilt later): %r", exc)


def quota_status(*, project_id, user_id) -> dict:
    """The quotas that apply to a project (its own and its owner's), with what each
    scope used, as the database has it."""
    now = timezone.now()
    quotas = quotas_for(project_id=project_id, user_id=user_id)
    out = {}
    for scope in _scopes(project_id=project_id, user_id=user_id):
        quota = quotas[scope.kind]
        state = scope_state(scope, now)
        used = {
            "tokens_per_day": state["tokens_per_day"],
            "tokens_per_month": state["tokens_per_month"],
            "messages_per_minute": state["messages_per_minute"],
            "concurrent_runs": len(state["in_flight"]),
        }
        out[scope.kind] = [
            {
                "limit": name,
                "value": None if quota is None else getattr(quota, name),
                "used": used[name],
                "resets_at": resets_at(name, now),
            }
            for name in Quota.LIMITS
        ]
    return out
