"""A local HTTP server that speaks the OpenAI chat-completions streaming protocol.

The real LLM API is a remote service the tests cannot run; this stands in for it at the
protocol level (the official `openai` client talks to it unchanged). Its behaviour is
switched per test: stream tokens, answer an HTTP error, stall mid-stream, or stream
slowly enough to be cancelled. It calls tools as OpenAI's function calling does: a turn
of `turns` (or `every_turn`) streams tool calls, several at once when given several, in
fragments (ids and names first, then the arguments' JSON text in pieces, interleaved).
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.local_http import serve_in_thread


class _Server(ThreadingHTTPServer):
    # Room for a burst of connections at once (many workers' calls let through by a
    # shared limit at the same moment); the default backlog of 5 resets the rest.
    request_queue_size = 128


class FakeOpenAI:
    def __init__(self) -> None:
        self.mode = "ok"  # ok | error | stall | slow
        self.tokens = ["Hello", " from", " the", " model", "."]
        self.delay = 0.0  # seconds between tokens in "slow" mode
        self.requests: list[dict] = []
        self.error_status = 500
        # The usage reported at the end of a stream when the client asks for it
        # (`stream_options.include_usage`); None reports nothing.
        self.usage: dict | None = {"prompt_tokens": 21, "completion_tokens": 5}
        self.headers: list[dict] = []  # each request's headers, names in lower case
        # Answers to requests that offer tools, in order: {"tool_calls": [(name, args)]}
        # or {"tokens": [...]}; when none is left, `tokens`. `every_turn`, when set,
        # answers every such request.
        self.turns: list[dict] = []
        self.every_turn: dict | None = None
        # A rate limit of its own, as providers have: at most `rate_limit` requests in
        # any `rate_window` seconds (None: no limit); one more is answered 429 with
        # Retry-After, not counted as served. `peak_in_window`: the most requests it
        # served within one window; `rejected`: how many it answered 429.
        # Seconds before the first token of a streamed answer (a model's time to first
        # token; 0: at once).
        self.first_token_delay = 0.0
        self.rate_limit: int | None = None
        self.rate_window = 60.0
        self.retry_after = 1.0
        self.served_at: list[float] = []
        self.peak_in_window = 0
        self.rejected = 0
        self._rate_lock = threading.Lock()
        # When set, answers every request that offers tools and ends with the user's
        # message (a run's first step; the steps after it end with tool results).
        self.first_turn: dict | None = None
        self._release = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                server.requests.append({"path": self.path, "body": body})
                server.headers.append({k.lower(): v for k, v in self.headers.items()})
                if not self.path.endswith("/chat/completions"):
                    self._json(404, {"error": {"message": "unknown route"}})
                    return
                if not server._admit():
                    self._json(
                        429,
                        {"error": {"message": "rate limit reached", "type": "rate_limit"}},
                        headers={"Retry-After": f"{server.retry_after:g}"},
                    )
                    return
                if server.mode == "error":
                    self._json(
                        server.error_status,
                        {"error": {"message": "the model is overloaded", "type": "server_error"}},
                    )
                    return
                turn = server.every_turn
                last = (body.get("messages") or [{}])[-1]
                if turn is None and server.first_turn and last.get("role") == "user":
                    turn = server.first_turn if body.get("tools") else None
                if turn is None and body.get("tools") and server.turns:
                    turn = server.turns.pop(0)
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.send_header("Connection", "close")
                self.end_headers()
                if turn and body.get("tools") and "tool_calls" in turn:
                    self._tool_calls(body, turn["tool_calls"])
                    return
                tokens = (turn or {}).get("tokens") or server.tokens
                if server.first_token_delay:
                    time.sleep(server.first_token_delay)
                try:
                    for i, token in enumerate(tokens):
                        if server.mode == "stall" and i == 1:
                            # Hold the connection open without a byte until released.
                            server._release.wait(30)
                            return
                        if server.mode == "slow" and i:
                            time.sleep(server.delay)
                        self._chunk(
                            body,
                            {"role": "assistant", "content": token}
                            if i == 0
                            else {"content": token},
                        )
                    self._chunk(body, {}, finish="stop")
                    self._done(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client went away (a cancelled run)
                self.close_connection = True

            def _tool_calls(self, request, calls):
                n = len(server.requests)
                for i, (name, _args) in enumerate(calls):
                    self._chunk(
                        request,
                        {
                            "role": "assistant",
                            "tool_calls": [
                                {
                                    "index": i,
                                    "id": f"call_{n}_{i}",
                                    "type": "function",
                                    "function": {"name": name, "arguments": ""},
                                }
                            ],
                        },
                    )
                texts = [json.dumps(args) for _name, args in calls]
                for start in range(0, max(map(len, texts)), 7):
                    for i, text in enumerate(texts):
                        if text[start : start + 7]:
                            part = {"index": i, "function": {"arguments": text[start : start + 7]}}
                            self._chunk(request, {"tool_calls": [part]})
                self._chunk(request, {}, finish="tool_calls")
                self._done(request)
                self.close_connection = True

            def _done(self, request):
                """The usage chunk when the client asked for it, then the end."""
                wants_usage = (request.get("stream_options") or {}).get("include_usage")
                if wants_usage and server.usage is not None:
                    usage = dict(server.usage)
                    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
                    self._write(self._payload(request, choices=[], usage=usage))
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()

            def _payload(self, request, **fields):
                return {
                    "id": "chatcmpl-local",
                    "object": "chat.completion.chunk",
                    "created": int(time.time()),
                    "model": request.get("model", ""),
                    **fields,
                }

            def _chunk(self, request, delta, finish=None):
                choice = {"index": 0, "delta": delta, "finish_reason": finish}
                self._write(self._payload(request, choices=[choice]))

            def _write(self, payload):
                self.wfile.write(f"data: {json.dumps(payload)}\n\n".encode())
                self.wfile.flush()

            def _json(self, code, obj, headers=None):
                data = json.dumps(obj).encode()
                self.send_response(code)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._httpd = _Server(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def _admit(self) -> bool:
        """Whether a request is within the rate limit (then it counts as served)."""
        with self._rate_lock:
            now = time.monotonic()
            horizon = now - self.rate_window
            recent = [t for t in self.served_at if t > horizon]
            if self.rate_limit is not None and len(recent) >= self.rate_limit:
                self.rejected += 1
                return False
            recent.append(now)
            self.served_at = recent
            self.peak_in_window = max(self.peak_in_window, len(recent))
            return True

    def start(self) -> FakeOpenAI:
        serve_in_thread(self._httpd)
        return self

    def stop(self) -> None:
        self._release.set()
        self._httpd.shutdown()
        self._httpd.server_close()
