"""Writes a process owes to a store that was out of reach when they were due (a failed
job given back while the database was away), tried again on one thread of the process
every OWED_RETRY_SECONDS until each goes through.

What a process still owes when it ends is lost with it; the recovery passes then find
the work held by a worker that is gone, and send it again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from django.conf import settings
from django.db import connections

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_owed: dict[str, Callable[[], object]] = {}
_thread: threading.Thread | None = None


def owe(key: str, write: Callable[[], object]) -> None:
    """Try `write` again until it returns without raising (`key`: one write per key;
    a later one replaces it)."""
    global _thread
    with _lock:
        _owed[key] = write
        if _thread is None or not _thread.is_alive():
            _thread = threading.Thread(target=_retry, name="owed-writes", daemon=True)
            _thread.start()


def _retry() -> None:
    global _thread
    try:
        while True:
            time.sleep(settings.OWED_RETRY_SECONDS)
            with _lock:
                pending = list(_owed.items())
            for key, write in pending:
                try:
                    write()
                except Exception:
                    logger.debug("owed write %s: still failing", key, exc_info=True)
                    continue
                logger.warning("owed write %s: gone through", key)
                with _lock:
                    if _owed.get(key) is write:
                        del _owed[key]
            with _lock:
                if not _owed:
                    _thread = None
                    return
    finally:
        connections.close_all()  # this thread's
