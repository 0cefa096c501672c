"""Local HTTP servers of the tests (stand-ins for the remote services a test talks to)."""

from __future__ import annotations

import threading
from socketserver import BaseServer


def serve_in_thread(server: BaseServer) -> threading.Thread:
    """Start serving `server` from a daemon thread. Its `shutdown()` then returns within
    50 ms: at the standard library's poll interval (0.5 s) every test that stops a
    server would wait up to that long in its teardown."""
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    return thread
