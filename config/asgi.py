"""ASGI entry point. Streaming endpoints (Server-Sent Events) need it.

Django's handler speaks only HTTP; this wrapper answers the ASGI lifespan protocol so
that a server stopping (SIGTERM, Ctrl-C) releases what this process holds.
"""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.local")
django_application = get_asgi_application()


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
