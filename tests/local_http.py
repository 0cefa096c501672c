"""Local HTTP servers of the tests (stand-ins for the remote services a test talks to),
and the free port a server of a test listens on."""

from __future__ import annotations

import contextlib
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from socketserver import BaseServer


def free_port() -> int:
    """A TCP port nothing listens on now, on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_in_thread(server: BaseServer) -> threading.Thread:
    """Start serving `server` from a daemon thread. Its `shutdown()` then returns within
    50 ms: at the standard library's poll interval (0.5 s) every test that stops a
    server would wait up to that long in its teardown."""
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    return thread


class RunbookServer:
    """One Markdown file (a runbook naming the command `qctl-restart-9`) at `url`. Held,
    each answer waits until `release` is set (`asked` is set when a request comes)."""

    BODY = b"# Runbook\n\nRestart the queue with command qctl-restart-9.\n"

    def __init__(self, *, held: bool = False) -> None:
        self.asked, self.release = threading.Event(), threading.Event()
        if not held:
            self.release.set()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                outer.asked.set()
                outer.release.wait(60)
                with contextlib.suppress(OSError):  # the asking worker was killed meanwhile
                    self.send_response(200)
                    self.send_header("Content-Type", "text/markdown")
                    self.send_header("Content-Length", str(len(outer.BODY)))
                    self.end_headers()
                    self.wfile.write(outer.BODY)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/runbook.md"

    def start(self) -> RunbookServer:
        serve_in_thread(self.server)
        return self

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()


class RawEndpoint:
    """An endpoint on a socket of its own, for answers no HTTP server library writes
    (trickled, endless, a line that never ends): it reads each request's head, then
    `answer`s on the raw socket. `connections`: how many it accepted."""

    def __init__(self, path: str = "/hook") -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.base = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.url = self.base + path
        self.connections = 0
        self.closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                self.answer(conn)
            except OSError:
                return  # cut by the client

    def answer(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        self.closed.set()
        self.sock.close()
