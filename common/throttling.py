"""Rate limits (DRF throttles on the shared Redis cache): 429 with Retry-After, checked
before a view does anything.

- `LoginThrottle`: sign-in attempts per client address; `LoginUsernameThrottle`: per
  username *and* address, so that nobody can lock another user out from afar. The
  client address comes from X-Forwarded-For only behind trusted proxies
  (TRUSTED_PROXY_COUNT, DRF's NUM_PROXIES); otherwise it is the connection's peer.
- `UserScopedThrottle` / `ProjectScopedThrottle`: a view names, per method, the scope of
  what it does (`throttle_scopes = {"POST": "messages"}`); the rates are settings
  (`THROTTLE_RATES`, `<scope>_user` and `<scope>_project`, e.g. "60/min").

With Redis down the limits are not checked (logged), rather than failing the request.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping

import redis
from rest_framework.settings import api_settings
from rest_framework.throttling import SimpleRateThrottle

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


class MethodScopedThrottle(_Rates, SimpleRateThrottle):
    """Limits only the methods a view names in `throttle_scopes`, each under its scope."""

    suffix = ""

    def allow_request(self, request, view):
        base = getattr(view, "throttle_scopes", {}).get(request.method)
        if not base:
            return True
        self.scope = f"{base}_{self.suffix}"
        self.rate = self.get_rate()
        self.num_requests, self.duration = self.parse_rate(self.rate)
        return super().allow_request(request, view)


class UserScopedThrottle(MethodScopedThrottle):
    suffix = "user"

    def get_cache_key(self, request, view):
        if not request.user or not request.user.is_authenticated:
            return None
        return self.cache_format % {"scope": self.scope, "ident": request.user.pk}


class ProjectScopedThrottle(MethodScopedThrottle):
    suffix = "project"

    def get_cache_key(self, request, view):
        project_id = getattr(view, "kwargs", {}).get("project_id")
        if project_id is None:
            return None
        return self.cache_format % {"scope": self.scope, "ident": str(project_id)}
