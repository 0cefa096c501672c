"""Web request cost: CPU per request and requests/s of a trivial detail endpoint, with
and without the database connection pool, on a real uvicorn started as the Procfile
starts it.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/<existing db> \\
    REDIS_URL=redis://127.0.0.1:6379/13 .venv/bin/python bench/api.py [--rounds 3]

Each round starts one uvicorn per configuration (pool on: DB_WEB_POOL_MAX_SIZE=10; off:
DB_POOL_MAX_SIZE=0, a new PostgreSQL connection per request) and sends
`GET /my/projects/{id}/` with token authentication from an asyncio client holding
--concurrency requests in flight for --seconds. CPU is the server process's user+system
time over the run (from /proc), divided by the requests it answered.

Not measured here: TLS, a proxy in front, a database on another host (loopback
connections are cheap to open; over a network the pool saves more).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if __name__ == "__main__":
    sys.path[:0] = [str(ROOT)]
    if not os.environ.get("DATABASE_URL", "").startswith("postgres"):
        raise SystemExit("bench/api.py needs DATABASE_URL=postgres://... (the pool is psycopg's)")
    from bench.harness import bootstrap

    bootstrap("api")

import httpx  # noqa: E402
from django.contrib.auth import get_user_model  # noqa: E402
from rest_framework.authtoken.models import Token  # noqa: E402

from projects.models import Project  # noqa: E402


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Web:
    """uvicorn as the Procfile's `web` line starts it."""

    def __init__(self, pool: bool):
        self.port = free_port()
        env = dict(
            os.environ,
            DB_POOL_MAX_SIZE="10" if pool else "0",
            DB_WEB_POOL_MAX_SIZE="10",
            LOG_LEVEL="WARNING",
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "config.asgi:application", "--host", "127.0.0.1",
             "--port", str(self.port), "--lifespan", "on", "--no-access-log"],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.1)
        raise SystemExit("uvicorn did not start")

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(30)


async def hammer(url: str, token: str, concurrency: int, seconds: float) -> tuple[int, int]:
    """(answered with 200, anything else) in `seconds`."""
    ok = bad = 0
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(headers={"Authorization": f"Token {token}"}, limits=limits) as c:

        async def one() -> None:
            nonlocal ok, bad
            while time.monotonic() < deadline:
                response = await c.get(url)
                if response.status_code == 200:
                    ok += 1
                else:
                    bad += 1

        await asyncio.gather(*(one() for _ in range(concurrency)))
    return ok, bad


def run(pool: bool, url_path: str, token: str, concurrency: int, seconds: float) -> dict:
    web = Web(pool)
    try:
        url = f"http://127.0.0.1:{web.port}{url_path}"
        asyncio.run(hammer(url, token, concurrency, 1.0))  # warm up
        before = cpu_seconds(web.proc.pid)
        started = time.monotonic()
        ok, bad = asyncio.run(hammer(url, token, concurrency, seconds))
        elapsed = time.monotonic() - started
        cpu = cpu_seconds(web.proc.pid) - before
    finally:
        web.stop()
    if bad:
        raise SystemExit(f"{bad} requests failed")
    return {"rps": ok / elapsed, "cpu_ms": cpu / ok * 1e3}


def spread(values: list[float], fmt: str) -> str:
    return " / ".join(fmt.format(v) for v in (min(values), statistics.median(values), max(values)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--concurrency", type=int, default=8)
    opts = parser.parse_args()
    user, _ = get_user_model().objects.get_or_create(username="bench-api")
    project = Project.objects.filter(owner=user).first() or Project.objects.create(
        owner=user, name="bench"
    )
    token = Token.objects.get_or_create(user=user)[0].key
    path = f"/my/projects/{project.id}/"
    results: dict[str, list[dict]] = {"pool off": [], "pool on": []}
    for round_ in range(opts.rounds):
        for name in ("pool off", "pool on") if round_ % 2 == 0 else ("pool on", "pool off"):
            result = run(name == "pool on", path, token, opts.concurrency, opts.seconds)
            results[name].append(result)
            print(
                f"  round {round_ + 1} {name}: {result['rps']:.0f} req/s, "
                f"{result['cpu_ms']:.2f} ms CPU/request",
                flush=True,
            )
    print(
        f"\nGET {path.replace(str(project.id), '{id}')}: one uvicorn process, "
        f"{opts.concurrency} requests in flight, {opts.seconds:g} s per run, {opts.rounds} rounds"
    )
    print("\n| configuration | req/s | server CPU ms per request |")
    print("|---|---|---|")
    print("| | min / median / max | min / median / max |")
    for name, runs in results.items():
        rps = spread([r["rps"] for r in runs], "{:.0f}")
        cpu = spread([r["cpu_ms"] for r in runs], "{:.2f}")
        print(f"| {name} | {rps} | {cpu} |")


if __name__ == "__main__":
    main()
