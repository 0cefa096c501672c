"""Quotas: checked when a message is accepted, before its run can call a provider.

Counters live in Redis, per scope (the project, and its owner across all their
projects), under `gov:{p|u}:{id}:`:

- `limits:{YYYYMMDD}`: the scope's limits (a hash); present while the counters below
  are known to match the database;
- `tok:d:{YYYYMMDD}` and `tok:m:{YYYYMM}`: tokens recorded for runs accepted that day
  and month (UTC);
- `msg:{minute}`: messages accepted in that minute;
- `runs`: the runs in flight (a sorted set of run ids, scored by acceptance time).

The database is the truth: `Quota` for the limits, `RunUsage` for the tokens, the
agents' runs (through `governance.sources`) for what is in flight and was accepted
lately. Whenever `limits:` is missing (Redis flushed or restarted, a new day, an
operator changed a quota, or every QUOTA_RESYNC_SECONDS) the next admission rebuilds
the scope from the database first, so losing Redis loses no accounting. Admission
itself reads no database row.

Admission is one Lua script over both scopes, so concurrent messages cannot both pass
a check that only one of them may: a run in flight holds QUOTA_RUN_RESERVE_TOKENS of
the token budgets until it ends. A run is admitted while
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

from common.exceptions import BackendUnavailable
from common.redis import get_redis

from .models import Quota, RunUsage, UsageDaily
from .sources import run_source

logger = logging.getLogger(__name__)

KEY_NAMESPACE = "gov"
NO_LIMIT = -1
KEYS_PER_SCOPE = 5
COUNTER_TTL = 40 * 86400

# KEYS per scope: tok:d, tok:m, msg:{minute}, runs, limits. ARGV: now, run_id, reserve,
# stale_before, runs_ttl. Returns {0} when admitted; {1, scope} when a scope must be
# rebuilt first; {2, scope, limit index, used, limit} when refused.
ADMIT = """
local scopes = #KEYS / 5
local now, run_id, reserve = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local stale_before, runs_ttl = tonumber(ARGV[4]), tonumber(ARGV[5])
local limits = {}
for s = 0, scopes - 1 do
  limits[s] = redis.call('HMGET', KEYS[s * 5 + 5], '1', '2', '3', '4')
  if not limits[s][1] then return {1, s} end
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
    local limit = tonumber(limits[s][i])
    if limit >= 0 and used[i] >= limit then return {2, s, i, used[i], limit} end
  end
end
for s = 0, scopes - 1 do
  local k = s * 5
  redis.call('INCR', KEYS[k + 3])
  redis.call('EXPIRE', KEYS[k + 3], 120)
  redis.call('ZADD', KEYS[k + 4], now, run_id)
  redis.call('EXPIRE', KEYS[k + 4], runs_ttl)
end
return {0}
"""

# KEYS: tok:d, tok:m, msg:{minute}, runs, limits. ARGV: day, month, messages, resync
# ttl, counters' ttl, the four limits, then the in-flight runs (id, score, ...). Writes
# only if no other rebuild got there first.
REBUILD = """
if redis.call('EXISTS', KEYS[5]) == 1 then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[5])
redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[5])
redis.call('SET', KEYS[3], ARGV[3], 'EX', 120)
redis.call('DEL', KEYS[4])
for i = 10, #ARGV, 2 do redis.call('ZADD', KEYS[4], ARGV[i + 1], ARGV[i]) end
redis.call('EXPIRE', KEYS[4], ARGV[5])
redis.call('HSET', KEYS[5], '1', ARGV[6], '2', ARGV[7], '3', ARGV[8], '4', ARGV[9])
redis.call('EXPIRE', KEYS[5], ARGV[4])
return 1
"""

# KEYS per scope: tok:d, tok:m, limits (today's), runs. ARGV: tokens, the run to
# release ("" for none). Tokens count only while the scope is synced: otherwise the
# next rebuild reads them from the database.
CHARGE = """
for s = 0, #KEYS / 4 - 1 do
  local k = s * 4
  if ARGV[2] ~= '' then redis.call('ZREM', KEYS[k + 4], ARGV[2]) end
  if tonumber(ARGV[1]) > 0 and redis.call('EXISTS', KEYS[k + 3]) == 1 then
    for i = 1, 2 do
      if redis.call('EXISTS', KEYS[k + i]) == 1 then
        redis.call('INCRBY', KEYS[k + i], ARGV[1])
      end
    end
  end
end
return 1
"""


@dataclass(frozen=True)
class Scope:
    kind: str  # "project" or "user"
    id: str

    @property
    def prefix(self) -> str:
        return f"{KEY_NAMESPACE}:{self.kind[0]}:{self.id}:"

    def keys(self, now: datetime) -> list[str]:
        minute = int(now.timestamp()) // 60
        return [
            f"{self.prefix}tok:d:{now:%Y%m%d}",
            f"{self.prefix}tok:m:{now:%Y%m}",
            f"{self.prefix}msg:{minute}",
            f"{self.prefix}runs",
            f"{self.prefix}limits:{now:%Y%m%d}",
        ]

    @property
    def filter(self) -> dict:
        return {"project_id" if self.kind == "project" else "user_id": self.id}

    def quota(self) -> Quota | None:
        return Quota.objects.filter(**self.filter).first()


def _scopes(*, project_id, user_id) -> list[Scope]:
    return [Scope("project", str(uuid.UUID(str(project_id)))), Scope("user", str(user_id))]


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


def _limits(quota: Quota | None) -> list[int]:
    return [
        NO_LIMIT if quota is None or getattr(quota, name) is None else getattr(quota, name)
        for name in Quota.LIMITS
    ]


def scope_state(scope: Scope, now: datetime) -> dict:
    """What counts against a scope's limits now, as the database has it."""
    today = now.date()
    month = {**scope.filter, "day__gte": today.replace(day=1)}
    spend = {"month": Sum("total_tokens"), "day": Sum("total_tokens", filter=Q(day=today))}
    sums = RunUsage.objects.filter(**month).aggregate(**spend)
    # What retention rolled up (governance.rollups) counts as much as the raw rows.
    rolled = UsageDaily.objects.filter(**month).aggregate(**spend)
    sums = {key: (sums[key] or 0) + (rolled[key] or 0) for key in spend}
    source = run_source()
    minute_start = now.replace(second=0, microsecond=0)
    return {
        "tokens_per_day": sums["day"] or 0,
        "tokens_per_month": sums["month"] or 0,
        "messages_per_minute": source.accepted_since(since=minute_start, **scope.filter),
        "in_flight": source.in_flight(**scope.filter),
    }


def _rebuild(client: redis.Redis, scope: Scope, now: datetime) -> None:
    state = scope_state(scope, now)
    runs: list = []
    for run_id, accepted_at in state["in_flight"]:
        runs += [str(run_id), accepted_at.timestamp()]
    client.eval(
        REBUILD,
        KEYS_PER_SCOPE,
        *scope.keys(now),
        state["tokens_per_day"],
        state["tokens_per_month"],
        state["messages_per_minute"],
        max(1, int(settings.QUOTA_RESYNC_SECONDS)),
        COUNTER_TTL,
        *_limits(scope.quota()),
        *runs,
    )


def quota_admit(*, project_id, user_id, run_id) -> Refusal | None:
    """Admit run `run_id` against the project's and the user's quotas: None when
    admitted (it now counts as in flight until `quota_release`), or the first limit it
    would exceed.

    With Redis down, a scope without any quota admits (nothing to check); one with a
    quota refuses with QuotaUnavailable (a 503 with Retry-After): checked against the
    database alone, concurrent messages would each pass a check only one of them may
    (30 parallel messages against 5 per minute admitted 11)."""
    now = timezone.now()
    scopes = _scopes(project_id=project_id, user_id=user_id)
    try:
        return _admit(get_redis(), scopes, str(run_id), now)
    except redis.RedisError as exc:
        quotas = [scope.quota() for scope in scopes]
        if not any(quotas):
            return None
        logger.warning("quotas not checked, Redis unavailable: refused: %r", exc)
        raise QuotaUnavailable() from None


class QuotaUnavailable(BackendUnavailable):
    """The quotas cannot be checked (Redis down): refused rather than overshot."""

    default_detail = "Quotas cannot be checked right now; try again shortly."


def _admit(client, scopes, run_id, now) -> Refusal | None:
    keys = [key for scope in scopes for key in scope.keys(now)]
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
            int(settings.QUOTA_RUN_STALE_SECONDS),
        )
        if answer[0] == 0:
            return None
        if answer[0] == 1:
            _rebuild(client, scopes[answer[1]], now)
            continue
        _, scope_index, limit_index, used, limit_value = answer
        limit = Quota.LIMITS[limit_index - 1]
        return Refusal(
            scope=scopes[scope_index].kind,
            limit=limit,
            limit_value=int(limit_value),
            used=int(used),
            resets_at=resets_at(limit, now),
        )
    raise redis.RedisError("quota counters kept disappearing while being rebuilt")


def _used(state: dict, *, reserve: int = 0) -> dict[str, int]:
    flight = len(state["in_flight"])
    return {
        "tokens_per_day": state["tokens_per_day"] + flight * reserve,
        "tokens_per_month": state["tokens_per_month"] + flight * reserve,
        "messages_per_minute": state["messages_per_minute"],
        "concurrent_runs": flight,
    }


def quota_release(*, project_id, user_id, run_id) -> None:
    """The run no longer counts as in flight (it ended, or was never stored)."""
    try:
        pipe = get_redis().pipeline(transaction=False)
        for scope in _scopes(project_id=project_id, user_id=user_id):
            pipe.zrem(f"{scope.prefix}runs", str(run_id))
        pipe.execute()
    except redis.RedisError as exc:
        # The next rebuild from the database (the run has ended there) catches up.
        logger.warning("run %s not released from quota counters: %r", run_id, exc)


def quota_charge(*, project_id, user_id, day: date, tokens: int, release_run_id=None) -> None:
    """Add a run's recorded tokens to the counters of the day it was accepted, and
    (`release_run_id`) release the run from the in-flight set in the same round trip."""
    if tokens <= 0 and release_run_id is None:
        return
    accepted = datetime(day.year, day.month, day.day, tzinfo=UTC)
    now = timezone.now()
    keys = []
    for scope in _scopes(project_id=project_id, user_id=user_id):
        day_key, month_key = scope.keys(accepted)[:2]
        keys += [day_key, month_key, scope.keys(now)[4], f"{scope.prefix}runs"]
    release = "" if release_run_id is None else str(release_run_id)
    try:
        get_redis().eval(CHARGE, len(keys), *keys, max(0, tokens), release)
    except redis.RedisError as exc:
        logger.warning("quota counters not updated (rebuilt later): %r", exc)


def quota_save(*, quota: Quota) -> Quota:
    """Store an operator's quota; the next admission in its scope reads it."""
    quota.full_clean()
    quota.save()
    _invalidate(quota)
    return quota


def quota_delete(*, quota: Quota) -> None:
    quota.delete()
    _invalidate(quota)


def _invalidate(quota: Quota) -> None:
    scope = (
        Scope("project", str(quota.project_id))
        if quota.project_id
        else Scope("user", str(quota.user_id))
    )
    try:
        get_redis().delete(scope.keys(timezone.now())[4])
    except redis.RedisError as exc:
        # Read at the scope's next rebuild, at most QUOTA_RESYNC_SECONDS from now.
        logger.warning("quota change of %s not signalled: %r", scope, exc)


def quota_status(*, project_id, user_id) -> dict:
    """The quotas that apply to a project (its own and its owner's), with what counts
    against each now, as the database has it."""
    now = timezone.now()
    out = {}
    for scope in _scopes(project_id=project_id, user_id=user_id):
        quota = scope.quota()
        used = _used(scope_state(scope, now))
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
