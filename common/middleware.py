"""Middleware that keeps the API's answers in the API's shape, whatever answers them.

DRF views already answer errors through `common.api.exception_handler`. What answers
before or around them does not: Django's 404 for a path that matches no route (a
malformed id), the 405 of a plain view, a CSRF failure, a 500, and the slash redirects
of CommonMiddleware. On API routes (settings.API_PATH_PREFIXES) these become JSON in the
one error shape; everywhere else (the admin, the docs) Django's pages are kept.

Every middleware here runs natively in async mode (Django's `sync_capable` /
`async_capable`): one sync-only middleware in settings.MIDDLEWARE makes Django run the
whole chain below it inside one blocking call on asgiref's single shared thread, so a
request waiting for a worker (a context search, an event stream) would hold every other
such request behind it. Steps that do no I/O run on the event loop; the rest hop to a
thread only when they have work.
"""

from __future__ import annotations

import re

from asgiref.sync import iscoroutinefunction, markcoroutinefunction, sync_to_async
from django.conf import settings
from django.http import HttpRequest, HttpResponse, HttpResponseBadRequest
from django.urls import Resolver404, get_resolver
from django.utils.deprecation import MiddlewareMixin
from django.views.csrf import csrf_failure as django_csrf_failure
from whitenoise.middleware import WhiteNoiseMiddleware

from .api import database_unavailable, database_unavailable_response, error_response
from .asgi import LONG_LIVED

# Characters no path segment of ours may hold: C0 controls, DEL, lone surrogates.
_UNUSABLE_IN_PATH = re.compile("[\x00-\x1f\x7f\ud800-\udfff]")
# Headers an error keeps when its body is replaced.
_KEPT_HEADERS = ("Allow", "WWW-Authenticate", "Retry-After")


def is_api_path(path: str) -> bool:
    return path.startswith(tuple(settings.API_PATH_PREFIXES))


def _resolves(path: str) -> bool:
    try:
        get_resolver().resolve(path)
    except Resolver404:
        return False
    return True


class ApiErrorMiddleware(MiddlewareMixin):
    """Outermost: on API routes, an error response that is not JSON (Django's HTML 404,
    400, 403, 405 or 500 pages, under DEBUG its technical pages) is answered in the API's
    error shape, with the same status and its Allow / WWW-Authenticate headers.

    A view that fails because the database is unavailable (an outage, a restart, no
    pooled connection free within DB_POOL_TIMEOUT_SECONDS, a read-only server) answers
    503 with Retry-After instead of a 500: nothing it tried to write was committed (DRF
    views answer the same through common.api.exception_handler)."""

    async def __acall__(self, request: HttpRequest) -> HttpResponse:
        # No I/O: on the event loop, not a hop to the shared sync thread.
        return self.process_response(request, await self.get_response(request))

    def process_exception(self, request: HttpRequest, exception: Exception):
        response = database_unavailable_response(exception, where=request.path)
        if response is None or is_api_path(request.path_info):
            return response
        # Pages (the admin): a plain 503, with the same detail and Retry-After.
        detail = database_unavailable(exception)
        page = HttpResponse(detail, status=503, content_type="text/plain")
        page["Retry-After"] = response["Retry-After"]
        return page

    def process_response(self, request: HttpRequest, response: HttpResponse) -> HttpResponse:
        if response.status_code < 400 or not is_api_path(request.path_info):
            return response
        if response.get("Content-Type", "").startswith("application/json"):
            return response
        replaced = error_response(response.status_code)
        for name in _KEPT_HEADERS:
            if name in response:
                replaced[name] = response[name]
        return replaced


class ApiRequestMiddleware(MiddlewareMixin):
    """Before CommonMiddleware and CsrfViewMiddleware:

    - a path that a route takes while it holds a NUL, another control character or a
      lone surrogate is a 400 (a route without a free-text parameter does not match it:
      404);
    - an API path given without its trailing slash is served as the route with it,
      instead of a redirect (which a DELETE or POST cannot follow, and which Django
      refuses outright under DEBUG);
    - long-lived views (event streams) are exempt from Django's CSRF check: they answer
      GET only and change nothing, so another method gets their 405, not a CSRF 403.
      (DRF views are exempt already and check CSRF themselves for session clients.)
    """

    async def __acall__(self, request: HttpRequest) -> HttpResponse:
        # URL resolution only (no I/O): on the event loop.
        response = self.process_request(request)
        if response is not None:
            return response
        return await self.get_response(request)

    def process_request(self, request: HttpRequest) -> HttpResponse | None:
        path = request.path_info
        # Only where a route takes it (a name in the path): elsewhere it matches no
        # route and is the usual 404.
        if _UNUSABLE_IN_PATH.search(path) and _resolves(path):
            # No name or id holds one; a NUL would reach the database (PostgreSQL
            # refuses it in text: a 500), a lone surrogate cannot even be encoded.
            detail = "The path holds a control character or an invalid one."
            if is_api_path(path):
                return error_response(400, detail, "invalid")
            return HttpResponseBadRequest(detail)
        if path.endswith("/") or not is_api_path(path + "/") or _resolves(path):
            return
        if _resolves(path + "/"):
            request.path_info = path + "/"
            request.path = request.path + "/"

    def process_view(self, request, callback, callback_args, callback_kwargs) -> None:
        if getattr(callback, LONG_LIVED, False):
            request._dont_enforce_csrf_checks = True


class StaticFilesMiddleware(WhiteNoiseMiddleware):
    """WhiteNoise (static files), able to run async: WhiteNoise's own middleware is
    sync-only, which would put every request of the chain below it on one thread."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response=None, **kwargs):
        super().__init__(get_response, **kwargs)
        self.async_mode = iscoroutinefunction(get_response)
        if self.async_mode:
            markcoroutinefunction(self)

    def __call__(self, request):
        if self.async_mode:
            return self.__acall__(request)
        return super().__call__(request)

    async def __acall__(self, request):
        if self.autorefresh:  # development: looks on disk
            static_file = await sync_to_async(self.find_file, thread_sensitive=False)(
                request.path_info
            )
        else:
            static_file = self.files.get(request.path_info)
        if static_file is not None:
            return await sync_to_async(self.serve, thread_sensitive=False)(static_file, request)
        return await self.get_response(request)


def csrf_failure(request: HttpRequest, reason: str = "") -> HttpResponse:
    """settings.CSRF_FAILURE_VIEW: JSON on API routes, Django's page elsewhere."""
    if is_api_path(request.path_info):
        return error_response(403, f"CSRF Failed: {reason}", "csrf_failed")
    return django_csrf_failure(request, reason)
