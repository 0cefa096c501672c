"""Serving long-lived responses (event streams, requests waiting for a worker) under
ASGI without a thread each.

Django's ASGI handler runs every request inside a thread-sensitive context: the first
sync step of the request (any sync middleware, a `sync_to_async` call) gets a thread of
its own that lives as long as the response. For an event stream that is one idle thread
per open connection, for hours. `StreamingAwareASGIHandler` serves the views marked
`@long_lived` (for all methods, or only those named) outside that context, so their
short sync steps share asgiref's one sync thread and a waiting request costs a
coroutine only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from django.core.handlers.asgi import ASGIHandler, get_script_prefix
from django.urls import Resolver404, get_resolver

LONG_LIVED = "long_lived_response"


def long_lived(view: Callable[..., Any] | None = None, *, methods: Iterable[str] = ()):
    """Mark an async view whose response stays open or waits (Server-Sent Events, a
    request waiting for a worker): for every method, or only `methods`."""

    def mark(view: Callable[..., Any]) -> Callable[..., Any]:
        setattr(view, LONG_LIVED, frozenset(m.upper() for m in methods) or True)
        return view

    return mark(view) if view is not None else mark


def serves_long_lived(scope: dict) -> bool:
    """Whether the request of this ASGI scope goes to a `@long_lived` view."""
    if scope.get("type") != "http":
        return False
    path = scope.get("path", "")
    prefix = get_script_prefix(scope).rstrip("/")
    if prefix and path.startswith(prefix):
        path = path[len(prefix) :]
    try:
        match = get_resolver().resolve(path)
    except Resolver404:
        return False
    marked = getattr(match.func, LONG_LIVED, False)
    if isinstance(marked, frozenset):
        return scope.get("method", "GET").upper() in marked
    return bool(marked)


class StreamingAwareASGIHandler(ASGIHandler):
    async def __call__(self, scope, receive, send):
        if serves_long_lived(scope):
            await self.handle(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)
