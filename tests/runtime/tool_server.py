"""A local HTTP server that HTTP tools call in the tests (a remote service stands in
for the real ones). It records every request it gets.

- `/echo/...`  answers 200 with the method, path, query, body and the headers it got
  (so a test can see what a tool sent, secret included, and that the run scrubbed it).
- `/slow`      answers after `slow_seconds`.
- `/big`       answers `big_bytes` bytes.
- `/together`  answers only once two requests are in at once (a barrier): two calls
  made one after the other fail here, two made in parallel succeed.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from tests.local_http import serve_in_thread


class ToolServer:
    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.slow_seconds = 2.0
        self.big_bytes = 1024 * 1024
        self.barrier = threading.Barrier(2, timeout=5)
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                parts = urlsplit(self.path)
                seen = {
                    "method": self.command,
                    "path": parts.path,
                    "query": parse_qs(parts.query),
                    "body": json.loads(raw) if raw else None,
                    "headers": dict(self.headers.items()),
                }
                server.requests.append(seen)
                if parts.path.startswith("/echo"):
                    self._reply(200, json.dumps(seen).encode())
                elif parts.path == "/slow":
                    time.sleep(server.slow_seconds)
                    self._reply(200, b'{"late": true}')
                elif parts.path == "/big":
                    self._reply(200, b"x" * server.big_bytes)
                elif parts.path == "/together":
                    try:
                        server.barrier.wait()
                    except threading.BrokenBarrierError:
                        self._reply(500, b'{"error": "alone"}')
                        return
                    self._reply(200, b'{"together": true}')
                else:
                    self._reply(404, b'{"error": "no such route"}')

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

            def _reply(self, code, data):
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the caller gave up (a timeout)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def start(self) -> ToolServer:
        serve_in_thread(self._httpd)
        return self

    def stop(self) -> None:
        self.barrier.abort()
        self._httpd.shutdown()
        self._httpd.server_close()
