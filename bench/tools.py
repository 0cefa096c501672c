"""Tools benchmark: what one tool round-trip and one agent-to-agent call over the bus
cost, against a direct function call doing the same work.

    bin/with-redis --ephemeral -- .venv/bin/python bench/tools.py [--rounds 3] [--calls 200]

Real parts: Redis from REDIS_URL, the database from DATABASE_URL (SQLite under VAR_DIR
otherwise), a real Celery worker in this process (threads pool, 2 threads, following the
project queues as the shared pool does: tests.workers.shared_pool_worker), Qdrant local
mode under VAR_DIR, a local HTTP server the tool calls.

1. HTTP tool round-trip: `tool_execute` of a GET tool whose endpoint echoes its query
   (the arguments checked against the tool's JSON Schema, the host resolved and checked
   against private ranges, one HTTP request on a new connection, the secrets scrubbed),
   against the direct call `json.dumps(arguments)`.
2. Agent-to-agent call: `agent_call` from a running run to an offline agent of the same
   project (its session, messages and child run written, dispatched on the project's
   queue, claimed by the worker, answered into its event stream, the end event read back
   by the caller), against the direct call of the callee's answer
   (`OfflineProvider.answer`).

Each round makes --calls calls of each (after a warm-up); the table gives p50 and p95
per round as min / median / max over the rounds, and the median overhead per call.

Left out: a real LLM (the caller's model turns are not timed, only the call), the tool
loop's events and `Run.steps` writes around a call (a few Redis and database round
trips), TLS, a remote HTTP server or DNS lookups (the endpoint is 127.0.0.1), several
worker processes, and a remote Redis or database. The callee uses no context search
(top_k 0) but still remembers its exchange after answering, on the worker.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if __name__ == "__main__":
    sys.path[:0] = [str(ROOT)]
    from bench.harness import bootstrap

    bootstrap(
        "tools",
        offline=True,
        # The tool's endpoint is on loopback; every call of a round comes from one run.
        EGRESS_ALLOW_NETWORKS_TOOLS="127.0.0.0/8",
        AGENT_CALL_MAX_FANOUT="1000000",
    )

from django.core.management import call_command  # noqa: E402

from chat.calls import agent_call  # noqa: E402
from chat.models import Message, Run  # noqa: E402
from llm.providers import ChatRequest, OfflineProvider  # noqa: E402
from tests.factories import (  # noqa: E402
    AgentFactory,
    ChatSessionFactory,
    ProjectFactory,
    UserFactory,
)
from tests.workers import shared_pool_worker  # noqa: E402
from tools.runner import ToolScope, ToolSpec, tool_execute  # noqa: E402


class Echo(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        data = json.dumps({"path": self.path}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def timed(call, n: int) -> list[float]:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return times


def pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def spread(values: list[float]) -> str:
    return " / ".join(
        f"{v * 1e3:.3f}" for v in (min(values), statistics.median(values), max(values))
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=200)
    opts = parser.parse_args()
    for name in ("httpx", "celery", "kombu", "workspaces"):
        logging.getLogger(name).setLevel(logging.WARNING)

    call_command("migrate", verbosity=0)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    spec = ToolSpec(
        name="echo",
        kind="http",
        description="",
        parameters={"type": "object", "properties": {"city": {"type": "string"}}},
        safe_to_repeat=True,
        method="GET",
        url_template=f"http://127.0.0.1:{httpd.server_address[1]}/echo/{{city}}",
        headers={"Authorization": "Bearer {{secret:KEY}}"},
        timeout=10,
    )

    user = UserFactory(username=f"bench-{uuid.uuid4().hex[:12]}")
    project = ProjectFactory(owner=user, name="tools bench")
    caller = AgentFactory(project=project, name="caller", model="offline")
    callee = AgentFactory(project=project, name="callee", model="offline", params={"top_k": 0})
    session = ChatSessionFactory(agent=caller, project=project)
    message = Message.objects.create(session=session, role="assistant", status="streaming")
    parent = Run.objects.create(session=session, message=message, agent=caller, status="running")
    scope = ToolScope(
        user_id=user.id,
        project_id=project.id,
        agent_id=str(caller.id),
        secrets={"KEY": "bench-secret-value"},
        run_id=str(parent.id),
    )
    arguments = {"city": "Paris"}
    callee_spec = ToolSpec(
        name="callee",
        kind="agent",
        description="",
        parameters={},
        safe_to_repeat=False,
        target_agent_id=str(callee.id),
    )
    request = ChatRequest(model="offline", messages=[], question="What do you hold?")

    def http_tool():
        outcome = tool_execute(spec=spec, arguments=json.dumps(arguments), scope=scope)
        assert outcome.ok, outcome.content

    def a2a():
        ok, content, _links = agent_call(
            spec=callee_spec, arguments={"message": "What do you hold?"}, scope=scope
        )
        assert ok, content

    rows: dict[str, dict[str, list[float]]] = {}

    def record(name: str, times: list[float]) -> None:
        row = rows.setdefault(name, {"p50": [], "p95": []})
        row["p50"].append(pct(times, 50))
        row["p95"].append(pct(times, 95))

    print(
        f"Tools: Redis {os.environ['REDIS_URL']}, one in-process worker (threads, 2), "
        f"{opts.calls} calls per measure, {opts.rounds} rounds",
        flush=True,
    )
    with shared_pool_worker():
        timed(http_tool, 20)
        timed(a2a, 5)
        for round_ in range(opts.rounds):
            record(
                "direct call: json.dumps(arguments)",
                timed(lambda: json.dumps(arguments), opts.calls),
            )
            record("HTTP tool round-trip (tool_execute)", timed(http_tool, opts.calls))
            record(
                "direct call: the callee's answer",
                timed(lambda: OfflineProvider().answer(request), opts.calls),
            )
            record("agent-to-agent call over the bus", timed(a2a, max(10, opts.calls // 4)))
            print(f"  round {round_ + 1} done", flush=True)
    httpd.shutdown()

    print()
    print("| measure | p50 ms (min / median / max) | p95 ms (min / median / max) |")
    print("|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {spread(row['p50'])} | {spread(row['p95'])} |")
    names = list(rows)
    print()
    print("| overhead per call (median p50) | ms |")
    print("|---|---:|")
    pairs = [(names[1], names[0]), (names[3], names[2])]
    for measured, direct in pairs:
        extra = statistics.median(rows[measured]["p50"]) - statistics.median(rows[direct]["p50"])
        print(f"| {measured} | {extra * 1e3:.3f} |")


if __name__ == "__main__":
    main()
