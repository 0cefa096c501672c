"""Hooks run when a process stops, so each app releases what it holds without the entry
points (ASGI lifespan, Celery worker and pool-process shutdown, interpreter exit)
knowing the apps.

Apps register in `AppConfig.ready()`:
- `on_shutdown(fn)`: a plain callable, run once per process;
- `on_loop_shutdown(coroutine_fn)`: awaited on the event loop that is stopping (ASGI),
  for clients bound to that loop.
"""

from __future__ import annotations

import atexit
import logging
import threading
from collections.abc import Awaitable, Callable

from celery.signals import worker_process_shutdown, worker_shutdown

from .redis import close_redis

logger = logging.getLogger(__name__)

_sync_hooks: list[Callable[[], object]] = []
_async_hooks: list[Callable[[], Awaitable[object]]] = []
_lock = threading.Lock()


def on_shutdown(hook: Callable[[], object]) -> Callable[[], object]:
    if hook not in _sync_hooks:
        _sync_hooks.append(hook)
    return hook


def on_loop_shutdown(hook: Callable[[], Awaitable[object]]) -> Callable[[], Awaitable[object]]:
    if hook not in _async_hooks:
        _async_hooks.append(hook)
    return hook


def run_shutdown_hooks() -> None:
    """Run every sync hook, then close this process's Redis clients; one hook failing
    does not stop the others. Safe to call again (the worker and the interpreter both
    call it), so each hook must tolerate that."""
    with _lock:
        for hook in list(_sync_hooks):
            try:
                hook()
            except Exception:
                logger.exception("shutdown hook %r failed", hook)
        close_redis()


async def run_loop_shutdown_hooks() -> None:
    for hook in list(_async_hooks):
        try:
            await hook()
        except Exception:
            logger.exception("shutdown hook %r failed", hook)


def _on_worker_shutdown(**_) -> None:
    run_shutdown_hooks()


atexit.register(run_shutdown_hooks)
worker_shutdown.connect(_on_worker_shutdown, weak=False, dispatch_uid="common.lifecycle.worker")
worker_process_shutdown.connect(
    _on_worker_shutdown, weak=False, dispatch_uid="common.lifecycle.process"
)
