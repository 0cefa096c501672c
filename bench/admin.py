"""Admin pages bench: operators' pages over 100,000 runs, p50 / p95 / max latency and the
queries each page costs, beside a baseline (e.g. `main`) served the same way.

    BENCH_DB=uws_h27a bin/with-redis --ephemeral -- .venv/bin/python bench/admin.py \
        [--runs 100000] [--rounds 3] [--requests 30] [--baseline main] [--fill-only]

The web process is the Procfile's (uvicorn, one process, ASGI), on PostgreSQL (database
`$BENCH_DB`, default `uws_h27_admin`, created and filled once: --runs runs over 200
projects, each with its usage row, spread over the last 6 hours, ~3% in error; rolled up
per minute for the dashboards), logged in as a staff user through a session cookie.

With --baseline REF, REF's code (a `git archive` copy under var/bench-admin/) is served by
a second uvicorn on a copy of the database (`$BENCH_DB_base`, CREATE DATABASE … TEMPLATE)
on which the migrations this tree has beyond REF are unapplied (REF's schema, its
indexes), both ANALYZEd. Each round asks every page 3 times per variant to warm up, then
--requests times per variant, the variants in turn request by request (so both see the
same machine load); the table gives min / median / max over rounds of each round's p95,
the web process's own CPU time per request (median over rounds; /proc, the database's
CPU not included), and the queries of one request of this tree (Django's test client in
this process).

Settings changed: DEBUG=false, LOG_LEVEL=WARNING. Not measured: pages under concurrent
load, a remote database, the browser's own rendering of the charts; the planner's
statistics are fresh (ANALYZE), as autovacuum keeps them on a live table.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path

import httpx
import psycopg

ROOT = Path(__file__).resolve().parent.parent
PG = os.environ.get("BENCH_PG", "postgres://postgres@127.0.0.1:5432")
DB = os.environ.get("BENCH_DB", "uws_h27_admin")
if __name__ == "__main__":
    sys.path[:0] = [str(ROOT)]
    with psycopg.connect(f"{PG}/postgres", autocommit=True) as _conn:
        if not _conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [DB]).fetchone():
            _conn.execute(f'CREATE DATABASE "{DB}"')
    from bench.harness import bootstrap

    bootstrap("admin", DATABASE_URL=f"{PG}/{DB}")

from django.contrib.auth import get_user_model  # noqa: E402
from django.contrib.sessions.backends.db import SessionStore  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.db import connection, connections  # noqa: E402
from django.test import Client  # noqa: E402
from django.test.utils import CaptureQueriesContext, setup_test_environment  # noqa: E402
from django.utils import timezone  # noqa: E402

from agents.models import Agent  # noqa: E402
from chat.models import ChatSession, Message, Run  # noqa: E402
from governance.models import RunUsage  # noqa: E402
from observability.models import MinuteRollup  # noqa: E402
from observability.services import rollup_minutes  # noqa: E402
from projects.models import Project  # noqa: E402


def fill(runs: int) -> None:
    have = Run.objects.count()
    if have >= runs:
        if not MinuteRollup.objects.exists():  # a fill interrupted before its rollup
            rollup_minutes(now=timezone.now(), minutes=6 * 60 + 5)
        return
    print(f"filling: {have} runs, adding {runs - have}", flush=True)
    user_model = get_user_model()
    owner = user_model.objects.create_user(username=f"owner-{uuid.uuid4().hex[:8]}")
    projects = Project.objects.bulk_create(
        [Project(owner=owner, name=f"project {i:03d} {uuid.uuid4().hex[:4]}") for i in range(200)]
    )
    agents = Agent.objects.bulk_create(
        [Agent(project=p, name="helper", model="") for p in projects]
    )
    sessions = ChatSession.objects.bulk_create(
        [
            ChatSession(project=a.project, agent=a, title=f"s{i}") for a in agents for i in range(5)
        ]  # fmt: skip
    )
    now = timezone.now()
    rng = random.Random(7)
    batch = 5000
    for start in range(0, runs - have, batch):
        count = min(batch, runs - have - start)
        chosen = [rng.choice(sessions) for _ in range(count)]
        messages = Message.objects.bulk_create(
            [Message(session=s, role="assistant", status="done", content="answer") for s in chosen]
        )
        rows, usage = [], []
        for session, message in zip(chosen, messages, strict=True):
            finished = now - timedelta(seconds=rng.uniform(60, 6 * 3600))
            error = rng.random() < 0.03
            run = Run(
                session=session, message=message, agent=session.agent,
                status="error" if error else "done", model=rng.choice(["gpt-a", "gpt-b", "llama"]),
                error="the model failed" if error else "", created_at=finished,
                started_at=finished - timedelta(seconds=rng.uniform(0.5, 3)),
                first_token_at=finished - timedelta(seconds=rng.uniform(0.1, 0.5)),
                finished_at=finished, steps=[{"type": "tool", "attempt": 1, "step": 1,
                                              "name": "search", "status": "done"}],
            )  # fmt: skip
            rows.append(run)
            usage.append(
                RunUsage(
                    run_id=run.id,
                    project_id=session.project_id,
                    user=owner,
                    agent_id=session.agent_id,
                    message_id=message.id,
                    model=run.model,
                    prompt_tokens=200,
                    completion_tokens=50,
                    total_tokens=250,
                    outcome=run.status,
                    created_at=finished,
                    day=finished.date(),
                    recorded_at=finished,
                )  # fmt: skip
            )
        Run.objects.bulk_create(rows)  # created_at (auto_now_add) is set below
        RunUsage.objects.bulk_create(usage)
        print(f"  {have + start + count} runs", flush=True)
    with psycopg.connect(os.environ["DATABASE_URL"], autocommit=True) as conn:
        conn.execute("UPDATE agents_run SET created_at = started_at - interval '1 second'")
        conn.execute("VACUUM ANALYZE")
    rollup_minutes(now=now, minutes=6 * 60 + 5)


def session_cookie() -> str:
    user_model = get_user_model()
    staff, _ = user_model.objects.get_or_create(
        username="bench-staff", defaults={"is_staff": True, "is_superuser": True}
    )
    store = SessionStore()
    store["_auth_user_id"] = str(staff.pk)
    store["_auth_user_backend"] = "django.contrib.auth.backends.ModelBackend"
    store["_auth_user_hash"] = staff.get_session_auth_hash()
    store.create()
    return store.session_key


def pages() -> dict[str, str]:
    project = Project.objects.order_by("name").first()
    run = Run.objects.filter(session__project=project).order_by("-created_at").first()
    today = time.strftime("%Y-%m-%d")
    return {
        "runs, newest first": "/admin/chat/run/",
        "runs of a project": f"/admin/chat/run/?project={project.id}",
        "runs of a project and agent": (
            f"/admin/chat/run/?project={project.id}&agent={run.agent_id}"
        ),
        "runs in error": "/admin/chat/run/?status__exact=error",
        "runs of a model": "/admin/chat/run/?model=gpt-b",
        "runs since today": f"/admin/chat/run/?created_at__gte={today}",
        "runs, search by id": f"/admin/chat/run/?q={run.id}",
        "a run's page": f"/admin/chat/run/{run.id}/change/",
        "usage list": "/admin/governance/runusage/",
        "messages list": "/admin/chat/message/",
        "audit list": "/admin/governance/auditevent/",
        "dashboard, deployment 6 h": "/admin/dashboard/",
        "dashboard, deployment 24 h": "/admin/dashboard/?hours=24",
        "dashboard, project 6 h": f"/admin/dashboard/projects/{project.id}/",
    }


def queries_of(paths: dict[str, str]) -> dict[str, int]:
    setup_test_environment()
    client = Client()
    client.force_login(get_user_model().objects.get(username="bench-staff"))
    counts = {}
    for name, path in paths.items():
        with CaptureQueriesContext(connection) as queries:
            status = client.get(path).status_code
        assert status == 200, (name, status)
        counts[name] = len(queries.captured_queries)
    return counts


def baseline_copy(ref: str, db: str) -> tuple[Path, str]:
    """`ref`'s code (a `git archive` copy) and a copy of the filled database with `ref`'s
    schema: the migrations this tree has beyond `ref`'s are unapplied on the copy."""
    code = Path(os.environ["VAR_DIR"]) / f"baseline-{ref.replace('/', '_')}"
    if code.exists():
        shutil.rmtree(code)
    code.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", ref], cwd=ROOT, check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(code)], input=archive.stdout, check=True)
    copy = f"{db}_base"
    connections.close_all()  # a template database must have no other connection
    with psycopg.connect(f"{PG}/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{copy}"')
        # This process's other connections (Django's, from the pages asked in-process).
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s "
            "AND pid <> pg_backend_pid() AND application_name = ''",
            [db],
        )
        deadline = time.monotonic() + 120
        while True:  # autovacuum may be at work on the template
            try:
                conn.execute(f'CREATE DATABASE "{copy}" TEMPLATE "{db}"')
                break
            except psycopg.errors.ObjectInUse:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
    env = dict(os.environ, DATABASE_URL=f"{PG}/{copy}")
    for app in sorted(p.parent.parent.name for p in ROOT.glob("*/migrations/__init__.py")):
        ours = {p.stem for p in (ROOT / app / "migrations").glob("0*.py")}
        theirs = {p.stem for p in (code / app / "migrations").glob("0*.py")}
        if ours - theirs:
            target = max(theirs) if theirs else "zero"
            subprocess.run(
                [sys.executable, "manage.py", "migrate", app, target, "--verbosity", "0"],
                cwd=ROOT, env=env, check=True,
            )  # fmt: skip
    for name in (db, copy):
        with psycopg.connect(f"{PG}/{name}", autocommit=True) as conn:
            conn.execute("ANALYZE")
    return code, f"{PG}/{copy}"


def serve(cwd: Path, database_url: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    web = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "config.asgi:application", "--port", str(port),
         "--lifespan", "on", "--log-level", "warning", "--no-access-log", "--no-proxy-headers"],
        cwd=cwd, env=dict(os.environ, DATABASE_URL=database_url), start_new_session=True,
    )  # fmt: skip
    return web, f"http://127.0.0.1:{port}"


def cpu_ms(pid: int) -> float:
    """CPU time (user + system) the process has used, in ms (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")


def wait_up(client: httpx.Client) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            if client.get("/admin/").status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the web process does not answer"
        time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--fill-only", action="store_true", help="fill the database, then stop")
    parser.add_argument(
        "--baseline", metavar="REF", help="also serve REF (e.g. main), paired request by request"
    )
    options = parser.parse_args()

    call_command("migrate", verbosity=0)
    fill(options.runs)
    if options.fill_only:
        return
    cookie = session_cookie()
    paths = pages()
    queries = queries_of(paths)

    servers = {}  # variant: (process, url)
    try:
        if options.baseline:
            code, url = baseline_copy(options.baseline, DB)
            servers[options.baseline] = serve(code, url)
        servers["this tree"] = serve(ROOT, os.environ["DATABASE_URL"])
        clients = {
            name: httpx.Client(base_url=url, cookies={"sessionid": cookie}, timeout=60)
            for name, (_, url) in servers.items()
        }
        for client in clients.values():
            wait_up(client)
        p95s = {(name, v): [] for name in paths for v in servers}
        cpus = {(name, v): [] for name in paths for v in servers}
        loads = []
        for _ in range(options.rounds):
            for name, path in paths.items():
                for client in clients.values():
                    for _ in range(3):
                        assert client.get(path).status_code == 200, (name, path)
                timings = {v: [] for v in servers}
                before = {v: cpu_ms(web.pid) for v, (web, _) in servers.items()}
                for _ in range(options.requests):  # the variants in turn, request by request
                    for variant, client in clients.items():
                        t0 = time.perf_counter()
                        response = client.get(path)
                        timings[variant].append((time.perf_counter() - t0) * 1000)
                        assert response.status_code == 200, (variant, name)
                for variant, (web, _) in servers.items():
                    spent = cpu_ms(web.pid) - before[variant]
                    cpus[(name, variant)].append(spent / options.requests)
                for variant, values in timings.items():
                    values.sort()
                    p95s[(name, variant)].append(values[int(len(values) * 0.95) - 1])
            loads.append(os.getloadavg()[0])
    finally:
        for web, _ in servers.values():
            web.terminate()
            web.wait(20)

    print(
        f"\nadmin bench: PostgreSQL, {Run.objects.count()} runs over 200 projects, uvicorn x1 "
        f"per variant, {options.rounds} rounds x {options.requests} requests per page and "
        f"variant; {os.cpu_count()} CPUs; load average {min(loads):.2f}-{max(loads):.2f}\n"
    )
    print(
        f"| {'page':<30} | {'variant':<10} | {'p95 min':>8} | {'p95 median':>10} | "
        f"{'p95 max':>8} | web CPU ms/req | queries | goal p95 <= 300 ms |"
    )
    rule = "|".join("-" * n for n in (32, 12, 10, 12, 10, 16, 9, 20))
    print(f"|{rule}|")
    for (name, variant), values in p95s.items():
        count = queries[name] if variant == "this tree" else "-"
        median = statistics.median(values)
        verdict = "met" if median <= 300 else "NOT met"
        cpu = statistics.median(cpus[(name, variant)])
        print(f"| {name:<30} | {variant:<10} | {min(values):8.1f} | {median:10.1f} | "
              f"{max(values):8.1f} | {cpu:14.1f} | {count:>7} | {verdict:<18} |")  # fmt: skip


if __name__ == "__main__":
    main()
