"""Rate limits (DRF throttles on the shared Redis cache): 429 with Retry-After, checked
before a view does anything.

- `LoginThrottle`: sign-in attempts per client address and per username.
- `UserScopedThrottle` / `ProjectScopedThrottle`: a view names, per method, the scope of
  what it does (`throttle_scopes = {"POST": "messages"}`); the rates are settings
  (`THROTTLE_RATES`, `<scope>_user` and `<scope>_project`, e.g. "60/min").
"""

from __future__ import annotations

from rest_framework.settings import api_settings
from rest_framework.throttling import SimpleRateThrottle


class _Rates:
    def get_rate(self):
        # Read now, not when DRF's class was defined: settings may have changed since.
        return api_settings.DEFAULT_THROTTLE_RATES.get(self.scope)


class LoginThrottle(_Rates, SimpleRateThrottle):
    """Attempts per client address ("login_address") and per username ("login_username")."""

    scope = "login_address"

    def get_cache_key(self, request, view):
        return self.cache_format % {"scope": self.scope, "ident": self.get_ident(request)}


class LoginUsernameThrottle(_Rates, SimpleRateThrottle):
    scope = "login_username"

    def get_cache_key(self, request, view):
        username = request.data.get("username") if hasattr(request, "data") else None
        if not isinstance(username, str) or not username:
            return None
        return self.cache_format % {"scope": self.scope, "ident": username.lower()[:150]}


class _ScopedThrottle(_Rates, SimpleRateThrottle):
    suffix = ""

    def allow_request(self, request, view):
        base = getattr(view, "throttle_scopes", {}).get(request.method)
        if not base:
            return True
        self.scope = f"{base}_{self.suffix}"
        self.rate = self.get_rate()
        self.num_requests, self.duration = self.parse_rate(self.rate)
        return super().allow_request(request, view)


class UserScopedThrottle(_ScopedThrottle):
    suffix = "user"

    def get_cache_key(self, request, view):
        if not request.user or not request.user.is_authenticated:
            return None
        return self.cache_format % {"scope": self.scope, "ident": request.user.pk}


class ProjectScopedThrottle(_ScopedThrottle):
    suffix = "project"

    def get_cache_key(self, request, view):
        project_id = getattr(view, "kwargs", {}).get("project_id")
        if project_id is None:
            return None
        return self.cache_format % {"scope": self.scope, "ident": str(project_id)}
