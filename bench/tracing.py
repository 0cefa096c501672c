"""Tracing bench: chat messages answered per second with tracing on, tracing off, and
`main` (the code before tracing), paired in each round.

    bin/with-redis --ephemeral -- .venv/bin/python bench/tracing.py [--rounds 3] [--burst 150]

Each variant runs as `make run` runs it: the ASGI app under uvicorn (one process) and
one shared worker started with the Procfile's own `worker` line, on PostgreSQL (a
database per variant, `uws_h27_bench_<variant>`, created if missing: main's schema is
not this branch's) and the Redis of REDIS_URL. The agent answers with the offline
provider. Per round and variant: a fresh project with --burst sessions, 10 warm-up
messages, then one message per session posted at once (8 POSTs in flight); the figure is
messages answered per second from the first POST to the last answer (polled in the
database). Variants run in a rotated order each round.

- `main`: `git archive main` exported to --main-root (default /tmp/uws-h27-main);
- `off`: this tree, no OTEL_* variable;
- `on`: this tree, OTEL_EXPORTER_OTLP_ENDPOINT at an OTLP/HTTP receiver in this
  process (it decodes each export, as a collector would), batch span processor at its
  defaults, the default instrumentations (no span per Redis command or SQL statement);
- `on-full`: the same with OTEL_PYTHON_DISABLED_INSTRUMENTATIONS=none (Redis and
  psycopg spans too).

Beside the rate: CPU time the web and worker processes spent per message during the
burst (from /proc), less sensitive than wall time to what else loads the machine.

Settings changed from the defaults: throttles raised to 1000000/min; DEBUG=false;
LOG_LEVEL=WARNING (both variants alike). Not measured here: a real LLM (the offline
provider answers at once, so per-message overhead weighs more than it would), a remote
collector, several workers or web processes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]
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


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def procfile_worker(root: Path) -> list[str]:
    import re

    line = next(
        ln for ln in (root / "Procfile").read_text().splitlines() if ln.startswith("worker:")
    )
    command = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", line.split(":", 1)[1]).split()
    command = [part for part in command if "=" not in part or part.startswith("-")]
    return [sys.executable, "-m", *command, "--without-mingle", "--without-gossip"]


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its direct children (honcho-less: the web or
    worker process itself)."""
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


def ensure_main(root: Path) -> None:
    if (root / "manage.py").exists():
        return
    root.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "archive", "main"], cwd=ROOT, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(root)], input=archive.stdout, check=True)


def ensure_database(name: str) -> str:
    with psycopg.connect(f"{PG}/postgres", autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone():
            conn.execute(f'CREATE DATABASE "{name}"')
    return f"{PG}/{name}"


class Variant:
    def __init__(self, name: str, root: Path, otlp: str | None, **extra_env: str) -> None:
        self.name, self.root, self.otlp = name, root, otlp
        self.db = ensure_database(f"uws_h27_bench_{name.replace('-', '_')}")
        self.env = dict(
            os.environ,
            DJANGO_SETTINGS_MODULE="config.settings.local",
            DEBUG="false",
            SECRET_KEY="bench-only-not-secret",
            DATABASE_URL=self.db,
            VAR_DIR=str(ROOT / "var" / f"bench-tracing-{name}"),
            LOG_LEVEL="WARNING",
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
        self.env["CELERY_BROKER_URL"] = self.env["REDIS_URL"]
        if otlp:
            self.env["OTEL_EXPORTER_OTLP_ENDPOINT"] = otlp
        self.env.update(extra_env)
        Path(self.env["VAR_DIR"]).mkdir(parents=True, exist_ok=True)
        self.manage("migrate", "--noinput", "-v", "0")

    def manage(self, *args: str) -> str:
        done = subprocess.run(
            [sys.executable, "manage.py", *args], cwd=self.root, env=self.env,
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        if done.returncode:
            raise RuntimeError(f"{self.name}: manage.py {args[0]} failed:\n{done.stderr[-3000:]}")
        return done.stdout

    def round(self, burst: int) -> float:
        script = SETUP.replace("sys.argv[-1]", str(burst))
        setup = json.loads(
            subprocess.run(
                [sys.executable, "manage.py", "shell", "-c", script],
                cwd=self.root, env=self.env, capture_output=True, text=True, check=True,
            ).stdout.strip().splitlines()[-1]
        )  # fmt: skip
        port = free_port()
        logs = Path(self.env["VAR_DIR"])
        web_log = open(logs / "web.log", "ab")  # noqa: SIM115 (closed below)
        worker_log = open(logs / "worker.log", "ab")  # noqa: SIM115
        web = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "config.asgi:application", "--port", str(port),
             "--lifespan", "on", "--log-level", "warning", "--no-access-log"],
            cwd=self.root, env=self.env, start_new_session=True,
            stdout=web_log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        worker = subprocess.Popen(
            procfile_worker(self.root), cwd=self.root, env=self.env, start_new_session=True,
            stdout=worker_log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        base = f"http://127.0.0.1:{port}/my/projects/{setup['project']}"
        headers = {"Authorization": f"Token {setup['token']}"}
        try:
            deadline = time.monotonic() + 90
            while True:
                try:
                    if httpx.get(f"{base}/", headers=headers, timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name}: the web process does not answer")
                time.sleep(0.2)
            sessions = setup["sessions"]
            self.answer(base, headers, sessions[:10], parallel=1)  # warm-up
            cpu = cpu_seconds(web.pid) + cpu_seconds(worker.pid)
            rate = self.answer(base, headers, sessions[10:], parallel=8)
            cpu = cpu_seconds(web.pid) + cpu_seconds(worker.pid) - cpu
            return rate, cpu * 1000 / (len(sessions) - 10)
        finally:
            for proc in (web, worker):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, 15)
            for proc in (web, worker):
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, 9)
            web_log.close()
            worker_log.close()

    def answer(self, base: str, headers: dict, sessions: list[str], parallel: int) -> float:
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

            async with httpx.AsyncClient(headers=headers, timeout=60) as c:
                return await asyncio.gather(*(post(c, i, s) for i, s in enumerate(sessions)))

        started = time.time()
        answers = asyncio.run(post_all())
        with psycopg.connect(self.db) as conn:
            deadline = time.monotonic() + 600
            while True:
                done = conn.execute(
                    "SELECT count(*) FROM agents_message WHERE id = ANY(%s) AND status IN "
                    "('done', 'error')", [answers],
                ).fetchone()[0]  # fmt: skip
                conn.commit()
                if done == len(answers):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name}: {done}/{len(answers)} answered")
                time.sleep(0.02)
        return len(answers) / (time.time() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--burst", type=int, default=150)
    parser.add_argument("--main-root", default="/tmp/uws-h27-main")
    options = parser.parse_args()

    from tests.runtime.otlp_receiver import OtlpReceiver

    receiver = OtlpReceiver().start()
    main_root = Path(options.main_root)
    ensure_main(main_root)
    variants = [
        Variant("main", main_root, None),
        Variant("off", ROOT, None),
        Variant("on", ROOT, receiver.endpoint),
        Variant("on-full", ROOT, receiver.endpoint, OTEL_PYTHON_DISABLED_INSTRUMENTATIONS="none"),
    ]
    rates: dict[str, list[float]] = {v.name: [] for v in variants}
    cpus: dict[str, list[float]] = {v.name: [] for v in variants}
    loads = []
    for r in range(options.rounds):
        order = variants[r % len(variants) :] + variants[: r % len(variants)]
        for variant in order:
            rate, cpu = variant.round(options.burst)
            rates[variant.name].append(rate)
            cpus[variant.name].append(cpu)
            loads.append(os.getloadavg()[0])
            print(f"round {r + 1} {variant.name}: {rate:.1f} msg/s, {cpu:.1f} CPU ms/msg "
                  f"(load {loads[-1]:.2f})", flush=True)  # fmt: skip
    receiver.stop()

    print(f"\ntracing bench: PostgreSQL, Redis {os.environ.get('REDIS_URL')}, offline provider, "
          f"uvicorn x1, Procfile worker; burst {options.burst}, {options.rounds} rounds; "
          f"{os.cpu_count()} CPUs; load average during runs {min(loads):.2f}-{max(loads):.2f}; "
          f"spans received {len(receiver.spans)}\n")  # fmt: skip
    print(f"| {'variant':<28} | {'min':>7} | {'median':>7} | {'max':>7} | ratio (median) | goal |")
    print(f"|{'-' * 30}|{'-' * 9}|{'-' * 9}|{'-' * 9}|{'-' * 16}|------|")
    med = {k: statistics.median(v) for k, v in rates.items()}
    goals = {
        "main": ("", ""),
        "off": (f"{med['off'] / med['main']:.3f} of main", ">= 0.98 of main"),
        "on": (f"{med['on'] / med['off']:.3f} of off", ">= 0.9 of off"),
        "on-full": (f"{med['on-full'] / med['off']:.3f} of off", "(>= 0.9 of off)"),
    }
    labels = {
        "main": "main (before tracing)",
        "off": "tracing off",
        "on": "tracing on (OTLP)",
        "on-full": "on, + redis/psycopg spans",
    }
    for name, values in rates.items():
        print(f"| {labels[name] + ', msg/s':<28} | {min(values):7.1f} | {med[name]:7.1f} | "
              f"{max(values):7.1f} | {goals[name][0]:<14} | {goals[name][1]} |")  # fmt: skip
    print(f"\n| {'variant':<28} | CPU ms per message (web + worker): min | median | max |")
    print(f"|{'-' * 30}|{'-' * 41}|{'-' * 8}|{'-' * 5}|")
    for name, values in cpus.items():
        print(f"| {labels[name]:<28} | {min(values):39.1f} | {statistics.median(values):6.1f} "
              f"| {max(values):3.1f} |")  # fmt: skip
    paired_on = [on / off for on, off in zip(rates["on"], rates["off"], strict=True)]
    paired_full = [on / off for on, off in zip(rates["on-full"], rates["off"], strict=True)]
    paired_off = [off / m for off, m in zip(rates["off"], rates["main"], strict=True)]
    print(f"\nper-round ratios: on/off {[round(x, 3) for x in paired_on]}, "
          f"on-full/off {[round(x, 3) for x in paired_full]}, "
          f"off/main {[round(x, 3) for x in paired_off]}")  # fmt: skip


if __name__ == "__main__":
    main()
