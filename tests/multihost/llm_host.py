"""The test LLM server (tests.runtime.openai_server.FakeOpenAI) as a process of its own, on
an address other hosts reach: `python -m tests.multihost.llm_host ADDRESS PORT`.

It streams `tokens` tokens `delay` seconds apart (FakeOpenAI's "slow" mode). A second
port (PORT + 1) takes `POST /` with a JSON object of those two to change them while it
runs, and answers `GET /` with how many completions it served.
"""

from __future__ import annotations

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.runtime.openai_server import FakeOpenAI, _Server


def serve(address: str, port: int) -> None:
    fake = FakeOpenAI()
    # FakeOpenAI listens on loopback; the same handler on the host's own address.
    handler = fake._httpd.RequestHandlerClass
    fake._httpd.server_close()
    fake._httpd = _Server((address, port), handler)
    fake._httpd.daemon_threads = True
    fake.mode, fake.delay, fake.usage = "slow", 0.05, None
    fake.tokens = [f" t{i}" for i in range(10)]

    class Control(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _answer(self, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            fake.requests.clear()  # only counted, never read: keep memory flat
            self._answer({"delay": fake.delay, "tokens": len(fake.tokens)})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
            if "delay" in body:
                fake.delay = float(body["delay"])
            if "tokens" in body:
                fake.tokens = [f" t{i}" for i in range(int(body["tokens"]))]
            self._answer({"delay": fake.delay, "tokens": len(fake.tokens)})

    control = ThreadingHTTPServer((address, port + 1), Control)
    threading.Thread(target=control.serve_forever, daemon=True).start()
    print(f"LLM at http://{address}:{port}/v1", flush=True)
    fake._httpd.serve_forever()


if __name__ == "__main__":
    serve(sys.argv[1], int(sys.argv[2]))
