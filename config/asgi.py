"""ASGI entry point (uvicorn; event streams need it).

Django's handler speaks only HTTP; this wrapper also answers the ASGI lifespan protocol,
so that a server stopping (SIGTERM, Ctrl-C) runs every app's shutdown hooks.
"""

import gc
import os

import django
from asgiref.sync import sync_to_async

# Production unless told otherwise: `make run` and the tests name theirs.
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.production")
django.setup(set_prefix=False)

from django.conf import settings  # noqa: E402  (after django.setup)
from django.db import connections  # noqa: E402


def _web_database_pool() -> None:
    """A web process pools DB_WEB_POOL_MAX_SIZE connections, one per request it runs at
    once (WEB_MAX_CONCURRENT_REQUESTS); workers keep DB_POOL_MAX_SIZE. Set before the
    first connection opens the pool."""
    pool = connections["default"].settings_dict.get("OPTIONS", {}).get("pool")
    if isinstance(pool, dict):
        pool["max_size"] = max(settings.DB_WEB_POOL_MAX_SIZE, 1)


_web_database_pool()

from governance.secrets import fernet_keys_required_valid  # noqa: E402  (after django.setup)

fernet_keys_required_valid()

from common.asgi import StreamingAwareASGIHandler  # noqa: E402  (after django.setup)
from common.lifecycle import (  # noqa: E402
    run_loop_shutdown_hooks,
    run_shutdown_hooks,
    unwatch_server_stop,
    watch_server_stop,
)
from common.tracing import asgi_traced, tracing_setup, tracing_shutdown  # noqa: E402

# OTEL_* set: a server span per request, the trace carried on to the bus (common.tracing).
tracing_setup("uws-web")
django_application = asgi_traced(StreamingAwareASGIHandler())


def _web_garbage_collector() -> None:
    """Full collections less often, and none scanning what the process loaded as it
    started (WEB_GC_THRESHOLD0). Full collections come when the objects that survived
    grew by a quarter since the last; with the default thresholds a web process opening
    5,000 event streams ran over twenty, the last ones 0.4-0.7 s each, every request of
    the process waiting meanwhile."""
    if settings.WEB_GC_THRESHOLD0 > 0:
        gc.freeze()
        _, threshold1, threshold2 = gc.get_threshold()
        gc.set_threshold(settings.WEB_GC_THRESHOLD0, threshold1, threshold2)


async def application(scope, receive, send):
    if scope["type"] != "lifespan":
        return await django_application(scope, receive, send)
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            watch_server_stop()  # event streams end at SIGTERM, not at the window's end
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            unwatch_server_stop()
            await run_loop_shutdown_hooks()  # clients bound to this loop first
            await sync_to_async(run_shutdown_hooks)()
            await sync_to_async(tracing_shutdown)()
            await send({"type": "lifespan.shutdown.complete"})
            return


_web_garbage_collector()  # last: everything above is loaded
