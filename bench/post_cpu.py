"""CPU of one accepted chat POST in the web process, and where it goes: a Django test
client posts messages in a loop (one per session) against PostgreSQL and Redis, inside
this process, timed with `time.process_time` and, optionally, profiled with cProfile.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/<db> env -u REDIS_URL \\
        bin/with-redis --ephemeral -- .venv/bin/python bench/post_cpu.py [--posts 300] [--profile]

Left out: uvicorn and the ASGI entry (admission, the request's thread), HTTP parsing,
the worker (none runs: the runs stay on the bus). Settings changed: the API's throttles
are raised to 1000000/min unless set, so they are checked but never refuse. Every
other setting keeps its default: each round's one client has its token read once, then
trusted for AUTH_TOKEN_CACHE_SECONDS (5 s) as a busy client's would be.
The same Redis database is FLUSHED first.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import os
import pstats
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if __name__ == "__main__":
    sys.path[:0] = [str(ROOT)]
    from bench.harness import bootstrap

    bootstrap("post-cpu", capacity=True, offline=True)

import httpx  # noqa: E402
from django.contrib.auth import get_user_model  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.db import connection  # noqa: E402
from django.test import Client  # noqa: E402
from django.test.utils import CaptureQueriesContext  # noqa: E402
from rest_framework.authtoken.models import Token  # noqa: E402

from agents.models import Agent  # noqa: E402
from chat.models import ChatSession  # noqa: E402
from common.redis import get_redis  # noqa: E402
from projects.models import Project  # noqa: E402


def sessions(n: int) -> tuple[str, list[str]]:
    user = get_user_model().objects.create(username=f"bench-cpu-{uuid.uuid4().hex[:6]}")
    token = Token.objects.create(user=user).key
    project = Project.objects.create(owner=user, name="bench")
    agent = Agent.objects.create(project=project, name="a", model="offline")
    chats = ChatSession.objects.bulk_create(
        ChatSession(project=project, agent=agent) for _ in range(n)
    )
    return token, [f"/my/projects/{project.id}/chat/{s.id}/messages/" for s in chats]


def post_loop(client: Client, token: str, paths: list[str]) -> list[float]:
    cpu = []
    for path in paths:
        started = time.process_time()
        response = client.post(
            path, {"content": "hello?"}, content_type="application/json",
            HTTP_AUTHORIZATION=f"Token {token}",
        )  # fmt: skip
        cpu.append(time.process_time() - started)
        assert response.status_code == 202, (response.status_code, response.content[:300])
    return cpu


def served(paths: list[str], token: str, concurrency: int) -> float:
    """Web CPU (ms) per accepted POST through uvicorn as the Procfile starts it: `paths`
    posted `concurrency` at a time, the process's CPU time from /proc."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(Path(tempfile.mkdtemp(prefix="bench-post-cpu-")) / "web.log", "wb")  # noqa: SIM115
    web = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "config.asgi:application", "--host", "127.0.0.1",
         "--port", str(port), "--lifespan", "on", "--no-access-log", "--no-proxy-headers"],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"

    def cpu() -> float:
        fields = Path(f"/proc/{web.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    async def post_all(batch: list[str]) -> list[int]:
        headers = {"Authorization": f"Token {token}"}
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60) as client:
            gate = asyncio.Semaphore(concurrency)

            async def one(path: str) -> int:
                async with gate:
                    return (await client.post(path, json={"content": "hello?"})).status_code

            return await asyncio.gather(*(one(p) for p in batch))

    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/my/projects/", timeout=2).status_code == 401:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("uvicorn did not start")
            time.sleep(0.2)
        warm, paths = paths[:20], paths[20:]
        asyncio.run(post_all(warm))
        before = cpu()
        codes = asyncio.run(post_all(paths))
        used = cpu() - before
        assert set(codes) == {202}, sorted(set(codes))
        return 1e3 * used / len(paths)
    finally:
        os.killpg(web.pid, signal.SIGKILL)
        web.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--posts", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument(
        "--served", type=int, default=0, metavar="N",
        help="also through uvicorn (as the Procfile starts it), N POSTs at a time",
    )  # fmt: skip
    parser.add_argument("--dump", help="write the cProfile stats to this file too")
    parser.add_argument("--queries", action="store_true", help="print one POST's queries")
    opts = parser.parse_args()
    call_command("migrate", verbosity=0)
    get_redis().flushdb()
    client = Client()
    token, paths = sessions(20)
    post_loop(client, token, paths)  # warm: the workspace, its queue, connections, imports
    medians, means = [], []
    for _ in range(opts.rounds):
        token, paths = sessions(opts.posts)
        cpu = post_loop(client, token, paths)
        medians.append(statistics.median(cpu) * 1e3)
        means.append(statistics.fmean(cpu) * 1e3)
    fmt = lambda v: " / ".join(f"{x:.2f}" for x in (min(v), statistics.median(v), max(v)))  # noqa: E731
    print(f"load average: {os.getloadavg()}")
    print(f"CPU per accepted POST, median of {opts.posts} (ms): {fmt(medians)}")
    print(f"CPU per accepted POST, mean of {opts.posts} (ms): {fmt(means)}")
    if opts.served:
        served_ms = []
        for _ in range(opts.rounds):
            token, paths = sessions(opts.posts + 20)
            served_ms.append(served(paths, token, opts.served))
        print(
            f"served by uvicorn, {opts.served} at a time, web CPU per POST (ms): {fmt(served_ms)}"
        )
    if opts.queries:
        token, paths = sessions(1)
        with CaptureQueriesContext(connection) as queries:
            post_loop(client, token, paths)
        for query in queries.captured_queries:
            print(query["sql"][:300])
    if opts.profile:
        token, paths = sessions(opts.posts)
        profiler = cProfile.Profile(time.process_time)  # CPU, not waits
        profiler.enable()
        post_loop(client, token, paths)
        profiler.disable()
        if opts.dump:
            profiler.dump_stats(opts.dump)
        out = io.StringIO()
        stats = pstats.Stats(profiler, stream=out)
        stats.sort_stats("cumulative").print_stats(opts.top)
        stats.sort_stats("tottime").print_stats(opts.top)
        print(out.getvalue())


if __name__ == "__main__":
    main()
