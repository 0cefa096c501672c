"""Shared limits on what projects share: a provider endpoint's requests and tokens per
minute, per (endpoint, model), across every project, worker and host (state in Redis).

Before a call, `wait_for_turn` takes a place in the endpoint's sliding one-minute window
(a sorted set of the calls made, and one of the tokens they were estimated to use, in
one script, so two workers never both take the last place); when the window is full it
waits until its oldest entry leaves, checking `should_stop`, and gives up only when the
wait would pass the run's deadline (`LimitDeadline`, a ProviderError). A 429 from the
endpoint blocks the (endpoint, model) for every worker for its `Retry-After`
(`hold_off`), and the call is tried again: a limit never fails a run that still has
time. After the call, `settle` corrects the tokens window with what the endpoint
reported.

Limits come from FLOW_LIMITS ({"<endpoint base URL or *>": {"rpm": n, "tpm": n}}).
A project that calls with a key of its own (the deployment's endpoint or its own) has a
window of its own under the same numbers: an endpoint limits each key, so its calls
take nothing from the deployment's key, and a 429 that its key earns holds off only it.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from django.conf import settings

from common.redis import get_redis

from .types import ProviderError, ProviderStopped, never

PREFIX = "uws:flow:limit:"
STATS_KEY = "uws:flow:limit:stats"
WINDOW_SECONDS = 60.0

# Take a place in the window, or say how long until one frees. KEYS: requests window,
# tokens window, the Retry-After block, stats. ARGV: rpm, tpm, estimated tokens, call id,
# the limit's name. Returns {wait seconds as a string, reason}; {"0", ""}: taken.
ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local blocked = redis.call('PTTL', KEYS[3])
if blocked > 0 then
  redis.call('HINCRBY', KEYS[4], 'hits:' .. ARGV[5], 1)
  return {tostring(blocked / 1000), 'retry-after'}
end
local horizon = now - 60
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', horizon)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', horizon)
local rpm, tpm, want = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
if rpm > 0 and redis.call('ZCARD', KEYS[1]) >= rpm then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  redis.call('HINCRBY', KEYS[4], 'hits:' .. ARGV[5], 1)
  return {tostring(tonumber(oldest[2]) + 60 - now), 'rpm'}
end
if tpm > 0 then
  local entries = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
  local used = 0
  for i = 1, #entries, 2 do used = used + tonumber(string.match(entries[i], ':(-?%d+)$')) end
  if used > 0 and used + want > tpm then
    -- Until enough of the oldest entries leave the window.
    local freed = used
    for i = 1, #entries, 2 do
      freed = freed - tonumber(string.match(entries[i], ':(-?%d+)$'))
      if freed + want <= tpm then
        redis.call('HINCRBY', KEYS[4], 'hits:' .. ARGV[5], 1)
        return {tostring(tonumber(entries[i + 1]) + 60 - now), 'tpm'}
      end
    end
    redis.call('HINCRBY', KEYS[4], 'hits:' .. ARGV[5], 1)
    return {tostring(tonumber(entries[#entries]) + 60 - now), 'tpm'}
  end
end
redis.call('ZADD', KEYS[1], now, ARGV[4])
redis.call('ZADD', KEYS[2], now, ARGV[4] .. ':' .. want)
redis.call('EXPIRE', KEYS[1], 120)
redis.call('EXPIRE', KEYS[2], 120)
return {'0', ''}
"""


class LimitDeadline(ProviderError):
    """A shared limit would not free up before the run's deadline."""


@dataclass(frozen=True)
class SharedLimit:
    endpoint: str
    model: str
    rpm: int
    tpm: int
    # A digest of the key the calls use when it is a project's own ("": the deployment's).
    credential: str = ""

    @property
    def name(self) -> str:
        """The limit as stats and metrics name it: projects' own keys together."""
        return f"{self.endpoint}|{self.model}" + ("|own key" if self.credential else "")

    def keys(self) -> list[str]:
        base = PREFIX + f"{self.endpoint}|{self.model}"
        if self.credential:
            base += f"|key:{self.credential}"
        return [f"{base}:requests", f"{base}:tokens", f"{base}:blocked", STATS_KEY]


def limit_for(endpoint: str, model: str, *, own_key: str = "") -> SharedLimit | None:
    """The shared limit of an endpoint and model (FLOW_LIMITS), or None; `own_key`: a
    project's own key, whose calls are counted apart."""
    limits = settings.FLOW_LIMITS or {}
    endpoint = str(endpoint or "").rstrip("/")
    rule = limits.get(endpoint) or limits.get(endpoint + "/") or limits.get("*")
    if not rule:
        return None
    rpm, tpm = int(rule.get("rpm") or 0), int(rule.get("tpm") or 0)
    if rpm <= 0 and tpm <= 0:
        return None
    credential = hashlib.sha256(own_key.encode()).hexdigest()[:16] if own_key else ""
    return SharedLimit(
        endpoint=endpoint, model=model or "", rpm=rpm, tpm=tpm, credential=credential
    )


def estimate_tokens(text_length: int, completion: int = 0) -> int:
    """Tokens a call is counted for before the endpoint says (about 4 characters each)."""
    return max(1, text_length // 4 + completion)


def wait_for_turn(
    limit: SharedLimit,
    *,
    tokens: int,
    deadline: float | None = None,
    should_stop: Callable[[], bool] = never,
) -> str:
    """Take a place in the limit's window, waiting as long as it is full; returns the
    call's id (for `settle`). `deadline`: time.monotonic() after which the run ends
    (LimitDeadline if the wait would pass it)."""
    client = get_redis()
    call = uuid.uuid4().hex
    keys = limit.keys()
    tokens = _counted(limit, tokens)
    waited = 0.0
    while True:
        wait_s, reason = client.eval(
            ACQUIRE, len(keys), *keys, limit.rpm, limit.tpm, tokens, call, limit.name
        )
        wait = max(0.0, float(wait_s))
        if not reason:
            if waited:
                client.hincrbyfloat(STATS_KEY, f"wait_seconds:{limit.name}", waited)
            return call
        if deadline is not None and time.monotonic() + wait > deadline:
            client.hincrby(STATS_KEY, f"deadline:{limit.name}", 1)
            raise LimitDeadline(
                f"the shared limit of the LLM endpoint ({reason}) did not free up "
                "before the run's deadline"
            )
        # A short jitter-free nap: the window frees at a known time; sleeping a bit past
        # it lets the worker that waited longest go first more often than not.
        nap = min(wait + 0.01, settings.FLOW_LIMIT_MAX_WAIT_SECONDS)
        until = time.monotonic() + nap
        while time.monotonic() < until:
            if should_stop():
                raise ProviderStopped()
            time.sleep(min(0.1, max(0.0, until - time.monotonic())))
        waited += nap


def answered(limit: SharedLimit, call: str, *, estimated: int) -> None:
    """Date the call's place in the window when the endpoint answered (its headers):
    the endpoint counted the call on arrival, later than its place was taken, so a
    window that frees by our clock first would let a call in before the endpoint's has
    freed (a 429)."""
    keys = limit.keys()
    now = time.time()
    pipe = get_redis().pipeline(transaction=False)
    pipe.zadd(keys[0], {call: now}, xx=True)
    pipe.zadd(keys[1], {f"{call}:{_counted(limit, estimated)}": now}, xx=True)
    pipe.execute()


def _counted(limit: SharedLimit, tokens: int) -> int:
    """The tokens a call is counted for: at least 1, at most the whole window (a call
    bigger than the limit still goes, alone)."""
    tokens = max(1, int(tokens))
    return min(tokens, limit.tpm) if limit.tpm else tokens


def settle(limit: SharedLimit, call: str, *, estimated: int, used: int | None) -> None:
    """Correct the tokens window with what the call really used (reported usage)."""
    counted = _counted(limit, estimated)
    if not limit.tpm or used is None or used == counted:
        return
    keys = limit.keys()
    get_redis().zadd(keys[1], {f"{call}:fix:{int(used) - counted}": time.time()})


def hold_off(limit: SharedLimit, seconds: float) -> None:
    """The endpoint answered 429: every worker waits `seconds` (its Retry-After)."""
    client = get_redis()
    keys = limit.keys()
    client.set(keys[2], "1", px=max(1, int(seconds * 1000)))
    client.hincrby(STATS_KEY, f"throttled:{limit.name}", 1)


def retry_after_seconds(headers, default: float = 1.0) -> float:
    """A 429's Retry-After (seconds; `retry-after-ms` when the endpoint sends it)."""
    if headers is None:
        return default
    try:
        if headers.get("retry-after-ms"):
            return float(headers["retry-after-ms"]) / 1000
        if headers.get("retry-after"):
            return float(headers["retry-after"])
    except (TypeError, ValueError):
        pass
    return default


def limit_figures() -> dict[str, dict[str, float]]:
    """Counters per limit name: hits (waits begun), wait_seconds, throttled (429s
    answered by the endpoint), deadline (runs the limit ended)."""
    out: dict[str, dict[str, float]] = {}
    for field, value in get_redis().hscan_iter(STATS_KEY, count=1000):
        kind, _, name = field.partition(":")
        out.setdefault(name, {})[kind] = float(value)
    return out
