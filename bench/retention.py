"""Retention bench: a sweep over N (1,000,000) expired messages in bounded chunks, while
another project chats.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/uws_retention_bench \\
      bin/with-redis --ephemeral -- .venv/bin/python bench/retention.py [--messages N]

The database named by DATABASE_URL (PostgreSQL) is dropped and created again. Each
round, in the same round:

1. N messages are written to project A (one tenant) with PostgreSQL's COPY, spread
   over N/1000 sessions whose last activity is 400 days ago (past
   RETENTION_SESSIONS_DAYS=30, which the worker runs with).
2. Baseline (idle): project B (another tenant) sends --chats messages one after the
   other, each answered by the worker; the time from the POST to the first
   `message.delta` of the answer on the SSE stream is recorded.
3. Subject: the retention sweep is sent to the same worker (the task beat sends,
   `lifecycle.retention_sweep`, RETENTION_CHUNK=1000 rows per transaction), and project
   B chats the same way until the sweep's report says it finished. The sweep's time,
   rows per second and chunks are recorded.

Everything runs as the Procfile runs it: uvicorn (one process) and the shared worker
(the Procfile's `worker` line: threads, `WORKER_CONCURRENCY`), Redis from REDIS_URL. The
offline provider answers (no LLM wait), so the first delta is mostly the platform's own
path: the sweep competes with it for the worker's threads' GIL, the database and the CPU.

Left out: runs and their steps (only messages are generated: each message of A has no
run row), Qdrant points of A, a real LLM, several worker processes, a PostgreSQL on
another host. Settings changed: RETENTION_SESSIONS_DAYS=30,
RETENTION_SWEEP_BUDGET_SECONDS=3600 (one sweep does it all), throttles raised to
1000000/min.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import statistics
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if __name__ == "__main__":
    sys.path[:0] = [str(ROOT)]
    os.environ.setdefault("RETENTION_CHUNK", "1000")
    url = os.environ.get("DATABASE_URL", "")
    if not url.startswith("postgres"):
        raise SystemExit(
            "bench/retention.py needs DATABASE_URL=postgres://…/<a database of its own>"
        )
    import psycopg

    name = url.rsplit("/", 1)[1]
    with psycopg.connect(url.rsplit("/", 1)[0] + "/postgres", autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{name}"')
    from bench.harness import bootstrap

    bootstrap(
        "retention",
        capacity=True,
        offline=True,
        RETENTION_SESSIONS_DAYS="30",
        RETENTION_SWEEP_BUDGET_SECONDS="3600",
    )

import httpx  # noqa: E402
from celery import current_app  # noqa: E402
from django.conf import settings  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.db import connection  # noqa: E402
from django.utils import timezone  # noqa: E402
from rest_framework.authtoken.models import Token  # noqa: E402

from bench.chat import (  # noqa: E402
    EventReader,
    Process,
    _up,
    free_port,
    procfile_worker,
    wait_until,
)
from chat.models import ChatSession, Message  # noqa: E402
from lifecycle.models import RetentionReport  # noqa: E402
from tests.factories import AgentFactory, ChatSessionFactory, ProjectFactory, UserFactory  # noqa: E402

MESSAGES_PER_SESSION = 1000


def copy_messages(project, agent, n: int) -> None:
    """n messages in n/1000 sessions of `project`, all 400 days old, by COPY."""
    when = timezone.now() - timedelta(days=400)
    sessions = [
        ChatSession(project=project, agent=agent, title=f"old {i}")
        for i in range(max(1, n // MESSAGES_PER_SESSION))
    ]
    ChatSession.objects.bulk_create(sessions)
    ChatSession.objects.filter(project=project).update(created_at=when)
    buffer = io.StringIO()
    stamp = when.isoformat()
    for i in range(n):
        session = sessions[i // MESSAGES_PER_SESSION % len(sessions)].id
        role = "user" if i % 2 == 0 else "assistant"
        buffer.write(f"{session}\t{role}\tan old message number {i}\tdone\t\t{stamp}\n")
    connection.ensure_connection()
    with connection.connection.cursor() as cursor:
        with cursor.copy(
            "COPY agents_message (session_id, role, content, status, error, created_at) FROM STDIN"
        ) as copy:
            copy.write(buffer.getvalue())
        connection.connection.commit()
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE agents_message")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--chats", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    options = parser.parse_args()
    logging.getLogger("httpx").setLevel(logging.WARNING)

    call_command("migrate", verbosity=0)
    owner_a, owner_b = UserFactory(username="tenant-a"), UserFactory(username="tenant-b")
    project_a = ProjectFactory(owner=owner_a, name="expired")
    agent_a = AgentFactory(project=project_a, name="old agent", model="offline")
    project_b = ProjectFactory(owner=owner_b, name="chatting")
    agent_b = AgentFactory(project=project_b, name="live agent", model="offline")
    session_b = ChatSessionFactory(agent=agent_b, project=project_b)
    token = Token.objects.create(user=owner_b).key

    port = free_port()
    web = Process(
        sys.executable, "-m", "uvicorn", "config.asgi:application", "--port", str(port),
        "--lifespan", "on", "--log-level", "warning", "--no-access-log",
    )  # fmt: skip
    worker = Process(*procfile_worker())
    base = f"http://127.0.0.1:{port}/my/projects/{project_b.id}"
    headers = {"Authorization": f"Token {token}"}
    client = httpx.Client(headers=headers, timeout=60)
    results = []
    try:
        wait_until(lambda: _up(client, f"{base}/agents/"), 60, "the web server")
        reader = EventReader(f"{base}/chat/{session_b.id}/events/", headers)
        reader.start()
        reader.connected.wait(30)

        def first_delta_ms(text: str) -> float:
            start_index = len(reader.since(0))
            t0 = time.perf_counter()
            response = client.post(f"{base}/chat/{session_b.id}/messages/", json={"content": text})
            assert response.status_code == 202, response.text
            answer = response.json()["assistant_message_id"]

            def finished():
                events = reader.since(start_index)
                ended = [e for e in events if e[1] in ("message.completed", "message.error")
                         and e[2].get("message_id") == answer]  # fmt: skip
                return events if ended else None

            events = wait_until(finished, 120, "the answer")
            assert not any(k == "message.error" for _, k, _ in events), events[-1]
            return (next(t for t, k, _ in events if k == "message.delta") - t0) * 1000

        for i in range(5):  # warm: workspace, queue followed, embedder loaded
            first_delta_ms(f"warm-up {i}")
        for round_no in range(1, options.rounds + 1):
            started = time.perf_counter()
            copy_messages(project_a, agent_a, options.messages)
            copy_seconds = time.perf_counter() - started
            expired = Message.objects.filter(session__project=project_a).count()
            idle = [first_delta_ms(f"idle {round_no}.{i}") for i in range(options.chats)]
            last = RetentionReport.objects.order_by("-id").values_list("id", flat=True).first()
            newer = RetentionReport.objects.filter(id__gt=last or 0, finished_at__isnull=False)
            t0 = time.perf_counter()
            current_app.send_task("lifecycle.retention_sweep")
            during = []
            while not during or not newer.exists():
                during.append(first_delta_ms(f"during {round_no}.{len(during)}"))
                if time.perf_counter() - t0 > 3600:
                    raise SystemExit("the sweep did not finish in an hour")
            report = RetentionReport.objects.order_by("-started_at").first()
            sweep_seconds = (report.finished_at - report.started_at).total_seconds()
            left = Message.objects.filter(session__project=project_a).count()
            results.append({
                "round": round_no, "expired": expired, "copy_s": copy_seconds,
                "sweep_s": sweep_seconds, "removed": report.removed.get("sessions_days", 0),
                "chunks": report.chunks, "left": left, "idle": idle, "during": during,
                "load": os.getloadavg(),
            })  # fmt: skip
            print(f"round {round_no}: {expired} expired, sweep {sweep_seconds:.1f} s, "
                  f"{len(during)} chats during, left {left}", flush=True)  # fmt: skip
        reader.stop = True
    finally:
        client.close()
        web.stop()
        worker.stop()

    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"\nretention bench: PostgreSQL, Redis {settings.REDIS_URL}, offline provider, "
          f"uvicorn x1, worker: {' '.join(procfile_worker()[3:])}, {os.cpu_count()} CPUs; "
          f"RETENTION_CHUNK={settings.RETENTION_CHUNK}; throttles raised; {uptime}\n")  # fmt: skip
    print(
        "| round | expired msgs | sweep s | rows/s | chunks | left | idle first delta p50 ms "
        "| during p50 ms | during max ms | ratio p50 | chats during | load (1m) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    ratios = []
    for r in results:
        idle, during = statistics.median(r["idle"]), statistics.median(r["during"])
        ratios.append(during / idle)
        print(f"| {r['round']} | {r['expired']} | {r['sweep_s']:.1f} | "
              f"{r['removed'] / max(r['sweep_s'], 1e-9):.0f} | {r['chunks']} | {r['left']} | "
              f"{idle:.1f} | {during:.1f} | {max(r['during']):.1f} | {during / idle:.2f} | "
              f"{len(r['during'])} | {r['load'][0]:.1f} |")  # fmt: skip
    sweeps = [r["sweep_s"] for r in results]
    print(f"\nsweep seconds min/median/max: {min(sweeps):.1f} / {statistics.median(sweeps):.1f} / "
          f"{max(sweeps):.1f}; ratio (during/idle first delta p50) min/median/max: "
          f"{min(ratios):.2f} / {statistics.median(ratios):.2f} / {max(ratios):.2f} "
          f"(goal <= 2.00: {'met' if max(ratios) <= 2 else 'NOT met'})")  # fmt: skip


if __name__ == "__main__":
    main()
