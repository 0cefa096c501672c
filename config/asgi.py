"""ASGI entry point. Streaming endpoints (Server-Sent Events) need it.

Django's handler speaks only HTTP; this wrapper answers the ASGI lifespan protocol so
that a server stopping (SIGTERM, Ctrl-C) releases what this process holds.
"""

import os

import django
from django.core.handlers.asgi import ASGIHandler

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.local")
django.setup(set_prefix=False)


class ProjectASGIHandler(ASGIHandler):
    """Django's ASGI handler, except that chat event streams run outside the per-request
    thread context.

    Inside that context the first sync step of a request (any sync middleware, the
    access check) gets a thread of its own that lives as long as the response: one idle
    thread per open event stream, for hours. Outside it those short steps share asgiref's
    single sync thread, and an open stream costs a coroutine and a Redis connection.
    """

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].endswith("/events/"):
            await self.handle(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)


django_application = ProjectASGIHandler()


async def application(scope, receive, send):
    if scope["type"] != "lifespan":
        return await django_application(scope, receive, send)
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            from asgiref.sync import sync_to_async

            from agents.runtime.streams import close_async_redis
            from workspaces.manager import get_worker_space_manager

            await close_async_redis()  # the event streams' pool, bound to this loop
            await sync_to_async(get_worker_space_manager().cleanup_all)()
            await send({"type": "lifespan.shutdown.complete"})
            return
