"""Serving long-lived responses (event streams) under ASGI without a thread each.

Django's ASGI handler runs every request inside a thread-sensitive context: the first
sync step of the request (any sync middleware, a `sync_to_async` call) gets a thread of
its own that lives as long as the response. For an event stream that is one idle thread
per open connection, for hours. `StreamingAwareASGIHandler` serves the views marked
`@long_lived` outside that context, so their short sync steps share asgiref's one sync
thread and an open stream costs a coroutine only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.core.handlers.asgi import ASGIHandler, get_script_prefix
from django.urls import Resolver404, get_resolver

LONG_LIVED = "long_lived_response"


def long_lived(view: Callable[..., Any]) -> Callable[..., Any]:
    """Mark an async view whose response stays open (Server-Sent Events)."""
    setattr(view, LONG_LIVED, True)
    return view


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
    return bool(getattr(match.func, LONG_LIVED, False))


class StreamingAwareASGIHandler(ASGIHandler):
    async def __call__(self, scope, receive, send):
        if serves_long_lived(scope):
            await self.handle(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)
