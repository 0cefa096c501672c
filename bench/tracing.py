"""Tracing bench: chat messages answered per second with tracing on, tracing off, and
`main`, interleaved so that each ratio compares seconds-apart slices of work.

    bin/with-redis --ephemeral -- .venv/bin/python bench/tracing.py \
        [--rounds 3] [--burst 60] [--slices 4] [--full] [--sampled 0.1] [--only off,on]
        [--db-pool 3]

Each variant runs as `make run` runs it: the ASGI app under uvicorn (one process) and
one shared worker started with the Procfile's own `worker` line, on PostgreSQL (a
database per variant, `uws_h27b_bench_<variant>`, created if missing: main's schema may
not be this branch's) and a Redis database of its own on REDIS_URL's server (db 1, 2,
...: a shared worker follows every active project queue of its database, so variants
must not share one). The agent answers with the offline provider.

A round starts every variant's web and worker (all stay up for the round, idle when it
is not their turn), makes a fresh project with --burst + 10 sessions in each, answers 10
warm-up messages per variant, then runs --slices slices in turn: in each, every variant
(rotated order) answers --burst/--slices messages, one per session, 8 POSTs in flight,
timed from the first POST to the last answer (polled in the database). A variant's rate
in the round is its messages over the sum of its slices' times; its CPU per message is
what its web and worker processes spent during its slices (from /proc). Ratios are
paired per round; the table gives min / median / max over rounds. Slices a few seconds
apart see the same machine load, which a variant run minutes after another does not
(a 2-core machine shared with other work swings by 2x in a minute).

Variants:
- `main`: `git archive main` exported to --main-root (re-exported when main moves);
- `off`: this tree, no OTEL_* variable;
- `on`: this tree, OTEL_EXPORTER_OTLP_ENDPOINT at an OTLP/HTTP receiver in this
  process (it decodes each export, as a collector would), batch span processor at its
  defaults, always-on sampler, the default instrumentations;
- `on-full` (--full): the same with OTEL_PYTHON_DISABLED_INSTRUMENTATIONS=none (a span
  per Redis command and SQL statement too);
- `on-sampled` (--sampled R): the same with OTEL_TRACES_SAMPLER=parentbased_traceidratio
  and OTEL_TRACES_SAMPLER_ARG=R: reported apart, not a way to meet the goal.

Settings changed from the defaults, alike in every variant: throttles raised to
1000000/min; DEBUG=false; LOG_LEVEL=WARNING; DB_POOL_MAX_SIZE and DB_WEB_POOL_MAX_SIZE
both --db-pool (3: every variant's processes are up at once, and PostgreSQL's
connections are shared with other work; the web then serves 3 requests at once, the
worker's runs share 3 connections).

Left out: a real LLM (the offline provider answers at once, so per-message overhead
weighs more than it would), a remote collector (the receiver's own CPU is this
process's, not counted), several workers or web processes, event streams (nobody reads
the answers' SSE), and beat and the maintenance worker (not started). The other
variants' idle processes are up during a variant's slice (the same for every variant).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

from tests.runtime.otlp_receiver import OtlpReceiver  # noqa: E402

PG = os.environ.get("BENCH_PG", "postgres://postgres@127.0.0.1:5432")

SETUP = r"""
import json, sys, uuid
from rest_framework.authtoken.models import Token
from django.contrib.auth import get_user_model
from projects.models import Project
from agents.models import Agent
from chat.models import ChatSession
n = int(sys.argv[-1])
user = get_user_model().objects.create_user(username="bench-" + uuid.uuid4().hex[:10], password="x")
project = Project.objects.create(owner=user, name="tracing bench " + uuid.uuid4().hex[:6])
agent = Agent.objects.create(project=project, name="bench", model="offline", params={"top_k": 2})
sessions = [str(ChatSession.objects.create(project=project, agent=agent).id) for _ in range(n + 10)]
print(json.dumps({"token": Token.objects.create(user=user).key, "project": str(project.id),
                  "sessions": sessions}))
"""
WARMUP = 10
IN_FLIGHT = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def procfile_worker(root: Path) -> list[str]:
    line = next(
        ln for ln in (root / "Procfile").read_text().splitlines() if ln.startswith("worker:")
    )
    command = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", line.split(":", 1)[1]).split()
    command = [part for part in command if "=" not in part or part.startswith("-")]
    return [sys.executable, "-m", *command, "--without-mingle", "--without-gossip"]


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its direct children."""
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


def ensure_main(root: Path) -> str:
    """main's tree at `root` (exported again when main has moved); main's commit."""
    commit = subprocess.run(
        ["git", "rev-parse", "main"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    stamp = root / ".bench-commit"
    if (root / "manage.py").exists() and stamp.exists() and stamp.read_text() == commit:
        return commit
    subprocess.run(["rm", "-rf", str(root)], check=True)
    root.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", commit], cwd=ROOT, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(root)], input=archive.stdout, check=True)
    stamp.write_text(commit)
    return commit


def ensure_database(name: str) -> str:
    with psycopg.connect(f"{PG}/postgres", autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone():
            conn.execute(f'CREATE DATABASE "{name}"')
    return f"{PG}/{name}"


class Variant:
    def __init__(
        self, name: str, root: Path, redis_db: int, pool: int, receiver=None, **extra_env: str
    ):
        self.name, self.root, self.receiver = name, root, receiver
        self.db = ensure_database(f"uws_h27b_bench_{name.replace('-', '_')}")
        redis = re.sub(r"/\d*$", "", os.environ["REDIS_URL"].rstrip("/")) + f"/{redis_db}"
        self.env = dict(
            os.environ,
            DJANGO_SETTINGS_MODULE="config.settings.local",
            DEBUG="false",
            SECRET_KEY="bench-only-not-secret",
            DATABASE_URL=self.db,
            REDIS_URL=redis,
            CELERY_BROKER_URL=redis,
            CELERY_RESULT_BACKEND=redis,
            VAR_DIR=str(ROOT / "var" / f"bench-tracing-{name}"),
            LOG_LEVEL="WARNING",
            DB_POOL_MAX_SIZE=str(pool),
            DB_WEB_POOL_MAX_SIZE=str(pool),
            PYTHONPATH=str(root),
            **{
                f"THROTTLE_{k}": "1000000/min"
                for k in (
                    "MESSAGES_USER",
                    "MESSAGES_PROJECT",
                    "SEARCHES_USER",
                    "SEARCHES_PROJECT",
                    "INGESTS_USER",
                    "INGESTS_PROJECT",
                )
            },  # fmt: skip
        )
        for key in [k for k in self.env if k.startswith("OTEL_")]:
            del self.env[key]
        if receiver is not None:
            self.env["OTEL_EXPORTER_OTLP_ENDPOINT"] = receiver.endpoint
        self.env.update(extra_env)
        Path(self.env["VAR_DIR"]).mkdir(parents=True, exist_ok=True)
        self.manage("migrate", "--noinput", "-v", "0")
        self.rates: list[float] = []
        self.cpus: list[float] = []
        self.web_cpus: list[float] = []
        self.spans_per_message: list[float] = []

    def manage(self, *args: str) -> str:
        done = subprocess.run(
            [sys.executable, "manage.py", *args], cwd=self.root, env=self.env,
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        if done.returncode:
            raise RuntimeError(f"{self.name}: manage.py {args[0]} failed:\n{done.stderr[-3000:]}")
        return done.stdout

    def start(self, burst: int) -> None:
        """A fresh project with its sessions; web and worker started and answering."""
        script = SETUP.replace("sys.argv[-1]", str(burst))
        setup = json.loads(self.manage("shell", "-c", script).strip().splitlines()[-1])
        self.sessions = setup["sessions"]
        self.spans_before = len(self.receiver.spans) if self.receiver else 0
        port = free_port()
        logs = Path(self.env["VAR_DIR"])
        self._logs = [open(logs / "web.log", "ab"), open(logs / "worker.log", "ab")]  # noqa: SIM115
        self.web = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "config.asgi:application", "--port", str(port),
             "--lifespan", "on", "--log-level", "warning", "--no-access-log"],
            cwd=self.root, env=self.env, start_new_session=True,
            stdout=self._logs[0], stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.worker = subprocess.Popen(
            procfile_worker(self.root), cwd=self.root, env=self.env, start_new_session=True,
            stdout=self._logs[1], stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.base = f"http://127.0.0.1:{port}/my/projects/{setup['project']}"
        self.headers = {"Authorization": f"Token {setup['token']}"}
        self.conn = psycopg.connect(self.db, autocommit=True)
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.base}/", headers=self.headers, timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: the web process does not answer")
            time.sleep(0.2)
        self.answer(self.take(WARMUP), parallel=1)
        self.elapsed = self.cpu = self.web_cpu = 0.0
        self.answered = 0

    def take(self, n: int) -> list[str]:
        taken, self.sessions = self.sessions[:n], self.sessions[n:]
        return taken

    def slice(self, n: int) -> None:
        web0, worker0 = cpu_seconds(self.web.pid), cpu_seconds(self.worker.pid)
        self.elapsed += self.answer(self.take(n), parallel=IN_FLIGHT)
        web1, worker1 = cpu_seconds(self.web.pid), cpu_seconds(self.worker.pid)
        self.web_cpu += web1 - web0
        self.cpu += web1 - web0 + worker1 - worker0
        self.answered += n

    def stop(self) -> None:
        """Ask web and worker to stop (they shut down at once, all variants together)."""
        for proc in (self.web, self.worker):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 15)

    def stopped(self) -> None:
        """Wait for web and worker to end; the round's figures."""
        for proc in (self.web, self.worker):
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()
        for log in self._logs:
            log.close()
        self.conn.close()
        del self.web
        if not self.answered:
            return
        self.rates.append(self.answered / self.elapsed)
        self.cpus.append(self.cpu * 1000 / self.answered)
        self.web_cpus.append(self.web_cpu * 1000 / self.answered)
        if self.receiver is not None:
            # All exported by now: the processes flush their batch processor on exit.
            spans = len(self.receiver.spans) - self.spans_before
            self.spans_per_message.append(spans / (self.answered + WARMUP))

    def answer(self, sessions: list[str], parallel: int) -> float:
        """Post one message to each session, `parallel` in flight; seconds until the last
        is answered."""
        base = self.base

        async def post_all():
            gate = asyncio.Semaphore(parallel)

            async def post(c, i, s):
                async with gate:
                    for _ in range(20):  # a 503 (overloaded) is retried after Retry-After
                        r = await c.post(f"{base}/chat/{s}/messages/", json={"content": f"q {i}?"})
                        if r.status_code != 503:
                            break
                        await asyncio.sleep(float(r.headers.get("Retry-After", "1")))
                    assert r.status_code == 202, r.text[:300]
                    return r.json()["assistant_message_id"]

            async with httpx.AsyncClient(headers=self.headers, timeout=60) as c:
                return await asyncio.gather(*(post(c, i, s) for i, s in enumerate(sessions)))

        started = time.monotonic()
        answers = asyncio.run(post_all())
        deadline = started + 600
        while True:
            done = self.conn.execute(
                "SELECT count(*) FROM agents_message WHERE id = ANY(%s) AND status IN "
                "('done', 'error')", [answers],
            ).fetchone()[0]  # fmt: skip
            if done == len(answers):
                return time.monotonic() - started
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: {done}/{len(answers)} answered")
            time.sleep(0.02)


def stats(values: list[float]) -> tuple[float, float, float]:
    return min(values), statistics.median(values), max(values)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--burst", type=int, default=60, help="messages per variant and round")
    parser.add_argument("--slices", type=int, default=4, help="turns per variant and round")
    parser.add_argument("--full", action="store_true", help="add on-full (Redis, SQL spans)")
    parser.add_argument("--sampled", type=float, default=None, help="add on-sampled (ratio)")
    parser.add_argument("--only", default="", help="comma-separated variants (default: all)")
    parser.add_argument("--db-pool", type=int, default=3, help="DB_POOL_MAX_SIZE")
    parser.add_argument("--main-root", default="/tmp/uws-h27b-main")
    options = parser.parse_args()

    main_commit = ensure_main(Path(options.main_root))
    receivers = []

    def receiver():
        receivers.append(OtlpReceiver().start())
        return receivers[-1]

    specs = [("main", Path(options.main_root), None, {}), ("off", ROOT, None, {}),
             ("on", ROOT, receiver, {})]  # fmt: skip
    if options.full:
        specs.append(("on-full", ROOT, receiver, {"OTEL_PYTHON_DISABLED_INSTRUMENTATIONS": "none"}))
    if options.sampled is not None:
        specs.append(("on-sampled", ROOT, receiver, {
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": str(options.sampled)}))  # fmt: skip
    only = {n for n in options.only.split(",") if n}
    variants = [
        Variant(name, root, i + 1, options.db_pool, make() if make else None, **env)
        for i, (name, root, make, env) in enumerate(specs)
        if not only or name in only
    ]
    per_slice = options.burst // options.slices
    loads = []
    for r in range(options.rounds):
        order = variants[r % len(variants) :] + variants[: r % len(variants)]
        try:
            for variant in order:
                variant.start(per_slice * options.slices)
            loads.append(os.getloadavg()[0])
            for s in range(options.slices):
                turn = order[s % len(order) :] + order[: s % len(order)]
                for variant in turn:
                    variant.slice(per_slice)
            loads.append(os.getloadavg()[0])
        finally:
            started = [variant for variant in order if hasattr(variant, "web")]
            for variant in started:
                variant.stop()
            for variant in started:
                variant.stopped()
        print(f"round {r + 1}: " + ", ".join(
            f"{v.name} {v.rates[-1]:.1f} msg/s {v.cpus[-1]:.1f} CPU ms/msg" for v in variants
        ) + f" (load {loads[-2]:.1f}-{loads[-1]:.1f})", flush=True)  # fmt: skip
    for rec in receivers:
        rec.stop()

    print(f"\ntracing bench: PostgreSQL, Redis {os.environ.get('REDIS_URL')} (a database per "
          f"variant), offline provider, uvicorn x1, Procfile worker; {per_slice * options.slices}"
          f" messages per variant and round in {options.slices} interleaved slices; "
          f"{options.rounds} rounds; main = {main_commit[:10]}; {os.cpu_count()} CPUs; "
          f"load average {min(loads):.1f}-{max(loads):.1f}\n")  # fmt: skip
    by = {v.name: v for v in variants}
    labels = {"main": "main", "off": "tracing off", "on": "tracing on (OTLP)",
              "on-full": "on, + Redis/SQL spans",
              "on-sampled": f"on, sampled {options.sampled}"}  # fmt: skip
    print("| variant | msg/s min / median / max | CPU ms/msg min / median / max | web CPU ms/msg"
          " (median) | spans/msg |")  # fmt: skip
    print("|---|---|---|---|---|")
    for v in variants:
        spans = f"{statistics.median(v.spans_per_message):.1f}" if v.spans_per_message else "0"
        print(f"| {labels[v.name]} | {'{:.1f} / {:.1f} / {:.1f}'.format(*stats(v.rates))} | "
              f"{'{:.1f} / {:.1f} / {:.1f}'.format(*stats(v.cpus))} | "
              f"{statistics.median(v.web_cpus):.1f} | {spans} |")  # fmt: skip
    print("\n| ratio, paired per round | msg/s min / median / max | CPU ms/msg median | goal |")
    print("|---|---|---|---|")
    pairs = [("off", "main", "msg/s >= 0.98 of main"), ("on", "off", "msg/s >= 0.9 of off"),
             ("on-full", "off", ""), ("on-sampled", "off", "")]  # fmt: skip
    for a, b, goal in pairs:
        if a in by and b in by:
            rate = [x / y for x, y in zip(by[a].rates, by[b].rates, strict=True)]
            cpu = [x / y for x, y in zip(by[a].cpus, by[b].cpus, strict=True)]
            print(f"| {a} / {b} | {'{:.3f} / {:.3f} / {:.3f}'.format(*stats(rate))} | "
                  f"{statistics.median(cpu):.3f} | {goal} |")  # fmt: skip


if __name__ == "__main__":
    main()
