"""Hooks run when a process stops, so each app releases what it holds without the entry
points (ASGI lifespan, Celery worker and pool-process shutdown, interpreter exit)
knowing the apps.

Apps register in `AppConfig.ready()`:
- `on_shutdown(fn)`: a plain callable, run once per process;
- `on_loop_shutdown(coroutine_fn)`: awaited on the event loop that is stopping (ASGI),
  for clients bound to that loop;
- `on_server_stopping(coroutine_fn)`: awaited on the serving loop as soon as the web
  process is told to stop (SIGTERM, Ctrl-C), before the server waits for the responses
  still open: long-lived ones (event streams) end, so it need not wait them out
  (`watch_server_stop`, from the ASGI lifespan's startup).

Work in a worker's threads asks `worker_stopping()` at its safe points: it turns true
when the worker's soft shutdown begins (SIGTERM under REMAP_SIGTERM=SIGQUIT), so work
still in flight can hand itself back before the window ends. Celery's thread pool can
neither time out nor kill a task (celery#9203): work that does not stop by itself keeps
the process alive, and the cold shutdown after the window logs CRITICAL trying.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import signal
import threading
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import redis
from celery.signals import celeryd_after_setup, worker_process_shutdown, worker_shutdown
from celery.worker import state as worker_state
from django.db import InterfaceError, OperationalError, connection

from .redis import close_redis

logger = logging.getLogger(__name__)
T = TypeVar("T")

_stopping = threading.Event()
_sync_hooks: list[Callable[[], object]] = []
_async_hooks: list[Callable[[], Awaitable[object]]] = []
_stopping_hooks: list[Callable[[], Awaitable[object]]] = []
_stopping_runs: set[asyncio.Task] = set()  # referenced until done
_watching: dict[signal.Signals, tuple[Callable, object]] = {}  # signal -> (ours, previous)
_lock = threading.Lock()


def worker_stopping() -> bool:
    """Whether this worker process is shutting down: work in flight should stop at its
    next safe point and hand itself back."""
    return _stopping.is_set()


# A Redis or database that cannot be reached (down, or cut off from this host): errors
# that mean "not now", not "never".
OUTAGES = (redis.ConnectionError, redis.TimeoutError, OperationalError, InterfaceError)


def outage_waited(call: Callable[[], T], *, what: str, most: float = 5.0) -> T:
    """`call()`, called again while it fails for want of Redis or the database, after a
    pause that doubles from 0.5 s up to `most`: a task a worker holds stays held by
    this worker until they answer, instead of failing. The recovery passes count a
    task a worker received as that worker's while the worker beats, so a task that
    failed here would be no one's. Raises the last error once this worker is told to
    stop (its tasks are then taken back as a stopped worker's)."""
    delay = 0.5
    while True:
        try:
            return call()
        except OUTAGES as exc:
            if isinstance(exc, OperationalError | InterfaceError):
                with contextlib.suppress(Exception):
                    connection.close()  # the next query opens a new one
            if _told_to_stop():
                raise
            logger.warning("%s: %s; trying again in %.1f s", what, exc, delay)
            if _stopping.wait(delay):
                raise
            delay = min(delay * 2, most)


def _told_to_stop() -> bool:
    # Our soft shutdown, or Celery's warm or cold one (a signal, or a worker stopped in
    # process, which sets these flags without a signal).
    flags = (worker_state.should_stop, worker_state.should_terminate)
    return _stopping.is_set() or any(f is not None and f is not False for f in flags)


def on_shutdown(hook: Callable[[], object]) -> Callable[[], object]:
    if hook not in _sync_hooks:
        _sync_hooks.append(hook)
    return hook


def on_loop_shutdown(hook: Callable[[], Awaitable[object]]) -> Callable[[], Awaitable[object]]:
    if hook not in _async_hooks:
        _async_hooks.append(hook)
    return hook


def on_server_stopping(
    hook: Callable[[], Awaitable[object]],
) -> Callable[[], Awaitable[object]]:
    if hook not in _stopping_hooks:
        _stopping_hooks.append(hook)
    return hook


def watch_server_stop() -> bool:
    """Run the `on_server_stopping` hooks on the running loop when this process gets
    SIGTERM or SIGINT, until `unwatch_server_stop`. The server's own handlers (uvicorn
    installs them before it loads the application) are chained, not replaced: they
    still stop it. Only on the main thread, where signals are handled; False elsewhere
    (a server in a thread)."""
    if threading.current_thread() is not threading.main_thread():
        return False
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        previous = signal.getsignal(sig)

        def handler(signum, frame, previous=previous) -> None:
            if not loop.is_closed():
                loop.call_soon_threadsafe(_run_stopping_hooks)
            if callable(previous):
                previous(signum, frame)
            elif previous == signal.SIG_DFL:  # what the signal did before: end the process
                signal.signal(signum, signal.SIG_DFL)
                signal.raise_signal(signum)

        signal.signal(sig, handler)
        _watching[sig] = (handler, previous)
    return True


def unwatch_server_stop() -> None:
    """Give the signals back to the handlers `watch_server_stop` chained (where its own
    are still installed)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig, (handler, previous) in list(_watching.items()):
        if signal.getsignal(sig) is handler:
            signal.signal(sig, previous)
        del _watching[sig]


def _run_stopping_hooks() -> None:
    async def run() -> None:
        for hook in list(_stopping_hooks):
            try:
                await hook()
            except Exception:
                logger.exception("stopping hook %r failed", hook)

    task = asyncio.get_running_loop().create_task(run())
    _stopping_runs.add(task)
    task.add_done_callback(_stopping_runs.discard)


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


def _soft_shutdown(worker) -> None:
    """The worker's soft shutdown (`WorkController.wait_for_soft_shutdown`, called from
    the SIGTERM/SIGQUIT handler): tell the work in flight to stop (`worker_stopping`),
    then wait until it has, or the window is over. Celery's own waits out the whole
    window even when nothing runs any more."""
    _stopping.set()
    window = float(worker.app.conf.worker_soft_shutdown_timeout or 0)
    if window <= 0 or not worker_state.active_requests:
        return
    logger.warning(
        "Soft shutdown: %d task(s) in flight get %gs", len(worker_state.active_requests), window
    )
    deadline = time.monotonic() + window
    while worker_state.active_requests and time.monotonic() < deadline:
        time.sleep(0.05)


def _install_soft_shutdown(sender=None, instance=None, **_) -> None:
    if instance is not None:
        instance.wait_for_soft_shutdown = lambda: _soft_shutdown(instance)


atexit.register(run_shutdown_hooks)
worker_shutdown.connect(_on_worker_shutdown, weak=False, dispatch_uid="common.lifecycle.worker")
worker_process_shutdown.connect(
    _on_worker_shutdown, weak=False, dispatch_uid="common.lifecycle.process"
)
celeryd_after_setup.connect(
    _install_soft_shutdown, weak=False, dispatch_uid="common.lifecycle.soft_shutdown"
)
