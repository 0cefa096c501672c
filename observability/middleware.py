"""HTTP request metrics (observability.metrics), natively async like the rest of the
chain (common.middleware): one sync-only middleware would put every request on a
thread."""

from __future__ import annotations

import time

from django.utils.deprecation import MiddlewareMixin

from .metrics import HTTP_LATENCY, HTTP_REQUESTS


def _route(request) -> str:
    match = getattr(request, "resolver_match", None)
    # The route's pattern, not the path: ids stay out of the labels.
    return match.route if match is not None and match.route else "unmatched"


def _record(request, response, started: float) -> None:
    route = _route(request)
    HTTP_REQUESTS.labels(request.method, route, f"{response.status_code // 100}xx").inc()
    HTTP_LATENCY.labels(request.method, route).observe(time.perf_counter() - started)


class HttpMetricsMiddleware(MiddlewareMixin):
    def __call__(self, request):
        if self.async_mode:
            return self.__acall__(request)
        started = time.perf_counter()
        response = self.get_response(request)
        _record(request, response, started)
        return response

    async def __acall__(self, request):
        started = time.perf_counter()
        response = await self.get_response(request)
        _record(request, response, started)
        return response
