"""Rate limits (DRF throttles on the shared Redis cache): 429 with Retry-After, checked
before a view does anything.

- `LoginThrottle`: sign-in attempts per client address; `LoginUsernameThrottle`: per
  username *and* address, so that nobody can lock another user out from afar. The
  client address comes from X-Forwarded-For only behind trusted proxies
  (TRUSTED_PROXY_COUNT, DRF's NUM_PROXIES); otherwise it is the connection's peer.
- `ScopedRatesThrottle`: a view names, per method, the scope of what it does
  (`throttle_scopes = {"POST": "messages"}`); the rates are settings (`THROTTLE_RATES`,
  `<scope>_user` and `<scope>_project`, e.g. "60/min"), both checked in one Redis script
  (`UserScopedThrottle` / `ProjectScopedThrottle`: one of them).

With Redis down the limits are not checked (logged), rather than failing the request.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Mapping

import redis
from django.core.cache import cache
from rest_framework.settings import api_settings
from rest_framework.throttling import BaseThrottle, SimpleRateThrottle

from .redis import get_redis
from .singletons import process_singleton

logger = logging.getLogger(__name__)


class _Rates:
    def get_rate(self):
        # Read now, not when DRF's class was defined: settings may have changed since.
        return api_settings.DEFAULT_THROTTLE_RATES.get(self.scope)

    def allow_request(self, request, view):
        # A limit that cannot be read lets the request through: a chat message is
        # accepted while Redis is down (and answered once it is back), a rate limit
        # must not turn that into a 503.
        try:
            return super().allow_request(request, view)
        except redis.RedisError as exc:
            logger.warning("rate limit %s not checked, Redis unavailable: %r", self.scope, exc)
            return True


class LoginThrottle(_Rates, SimpleRateThrottle):
    """Attempts per client address ("login_address") and per username ("login_username")."""

    scope = "login_address"

    def get_cache_key(self, request, view):
        return self.cache_format % {"scope": self.scope, "ident": self.get_ident(request)}


class LoginUsernameThrottle(_Rates, SimpleRateThrottle):
    """Attempts per (username, client address) ("login_username")."""

    scope = "login_username"

    def get_cache_key(self, request, view):
        # Before the view validates the body: it may be any JSON (the view answers 400).
        data = request.data
        username = data.get("username") if isinstance(data, Mapping) else None
        if not isinstance(username, str) or not username:
            return None
        # Per (username, address): guesses at one account from one place are limited,
        # while its owner, elsewhere, still signs in. Hashed: a username may hold any
        # character, a cache key should not.
        who = f"{username.lower()}\0{self.get_ident(request)}"
        ident = hashlib.sha256(who.encode("utf-8", "surrogatepass")).hexdigest()
        return self.cache_format % {"scope": self.scope, "ident": ident}


# One round trip for every limit a request is under (a message: its user's and its
# project's). Each limit is a list of the times of its accepted requests, newest first
# (DRF's SimpleRateThrottle history, kept in Redis instead of a pickled list). Nothing is
# recorded unless every limit allows: a refused request uses none of them. Returns nil,
# or the seconds until the tightest limit frees a place.
# KEYS: the limits' lists; ARGV: now, then (number, duration) per key.
_LIMITS_TAKE = """
local now = tonumber(ARGV[1])
local wait = 0
for i, key in ipairs(KEYS) do
  local number, duration = tonumber(ARGV[2 * i]), tonumber(ARGV[2 * i + 1])
  redis.call('LTRIM', key, 0, number)
  while true do
    local oldest = redis.call('LINDEX', key, -1)
    if not oldest or tonumber(oldest) > now - duration then break end
    redis.call('RPOP', key)
  end
  if redis.call('LLEN', key) >= number then
    local frees = duration  -- a limit of 0: never
    if number > 0 then
      frees = tonumber(redis.call('LINDEX', key, number - 1)) + duration - now
    end
    if frees > wait then wait = frees end
  end
end
if wait > 0 then return tostring(wait) end
for i, key in ipairs(KEYS) do
  redis.call('LPUSH', key, ARGV[1])
  redis.call('EXPIRE', key, math.ceil(tonumber(ARGV[2 * i + 1])))
end
return false
"""


@process_singleton(settings=("REDIS_URL",))
def _limits_take():
    return get_redis().register_script(_LIMITS_TAKE)


class MethodScopedThrottle(BaseThrottle):
    """Limits only the methods a view names in `throttle_scopes`, each under its scope
    per `suffixes` (`<scope>_user`, `<scope>_project`): all of them checked and taken in
    one Redis script, under the cache's key names (`throttle_<scope>_<ident>`)."""

    suffixes: tuple[str, ...] = ("user", "project")
    timer = time.time

    def allow_request(self, request, view):
        self._wait = None
        base = getattr(view, "throttle_scopes", {}).get(request.method)
        if not base:
            return True
        keys, args = [], []
        for suffix in self.suffixes:
            scope = f"{base}_{suffix}"
            ident = self.ident(suffix, request, view)
            rate = api_settings.DEFAULT_THROTTLE_RATES.get(scope)
            if ident is None or rate is None:
                continue
            number, duration = SimpleRateThrottle.parse_rate(None, rate)
            keys.append(cache.make_key(f"throttle_{scope}_{ident}"))
            args += [number, duration]
        if not keys:
            return True
        # A limit that cannot be read lets the request through: a chat message is
        # accepted while Redis is down (and answered once it is back), a rate limit
        # must not turn that into a 503.
        try:
            wait = _limits_take()(keys=keys, args=[repr(self.timer()), *args], client=get_redis())
        except redis.RedisError as exc:
            logger.warning("rate limit %s not checked, Redis unavailable: %r", base, exc)
            return True
        if wait is None:
            return True
        self._wait = float(wait)
        return False

    def wait(self):
        return self._wait

    @staticmethod
    def ident(suffix: str, request, view) -> str | None:
        user = request.user
        if not (user and user.is_authenticated):
            return None
        if suffix == "user":
            return str(user.pk)
        # A project's limit, per user: its owner's requests (every credential of the
        # project acts as its owner) share one, and anyone else's, answered 404 after
        # this check, fill a list of their own, never the owner's.
        project_id = getattr(view, "kwargs", {}).get("project_id")
        return None if project_id is None else f"{project_id}_{user.pk}"


class ScopedRatesThrottle(MethodScopedThrottle):
    """The user's and the project's limits of the view's scope, in one round trip."""


class UserScopedThrottle(MethodScopedThrottle):
    suffixes = ("user",)


class ProjectScopedThrottle(MethodScopedThrottle):
    suffixes = ("project",)
