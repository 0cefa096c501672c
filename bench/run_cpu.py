"""CPU of one chat run on the worker side, and what it asks of PostgreSQL and Redis: the
run task (`chat.tasks.run_agent`) is called in this process, one run after another, each
answering a message posted in its own session, timed with `time.process_time` and,
optionally, profiled with cProfile.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/<db> env -u REDIS_URL \\
        bin/with-redis --ephemeral -- .venv/bin/python bench/run_cpu.py [--runs 50] [--rounds 3]
        [--profile] [--statements]

The provider is a local server speaking the OpenAI streaming protocol
(tests/runtime/openai_server.py, 10 deltas, no delay), reached through the openai client
as a deployment's endpoint would be; the question is embedded by the bundled embedder and
the exchange stored in Qdrant local mode. `process_time` counts this process's CPU on
every thread, so the embedder's own threads and the stub server's are in it.

Left out: Celery (the task is called, not consumed: no broker round trip, no
prefetch), the web side (messages are posted with `chat.services.message_send` before the
clock starts), concurrency (one run at a time: no GIL contention, no import locks), and
the lease keeper's renewals (a run here ends well within a renewal period). The first
runs of a round warm imports, connections and the embedder and are not counted.
Settings changed: none of the service's (the API's throttles are raised, as every
bench does, but no request goes through the API).
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import os
import pstats
import statistics
import sys
import time
import traceback
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if __name__ == "__main__":
    sys.path[:0] = [str(ROOT)]
    from tests.runtime.openai_server import FakeOpenAI

    fake = FakeOpenAI().start()
    fake.tokens = [f"w{i} " for i in range(10)]
    from bench.harness import bootstrap

    bootstrap(
        "run-cpu",
        capacity=True,
        offline=True,
        OPENAI_BASE_URL=fake.base_url,
        OPENAI_API_KEY="bench",
    )

import redis  # noqa: E402
from django.contrib.auth import get_user_model  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.db import connection  # noqa: E402

from agents.models import Agent  # noqa: E402
from chat.models import ChatSession, Run  # noqa: E402
from chat.services import message_send  # noqa: E402
from chat.tasks import run_agent  # noqa: E402
from common.redis import get_redis  # noqa: E402
from projects.models import Project  # noqa: E402

WARM = 5


class Counted:
    """SQL statements (by first word) and Redis commands (a pipeline counts once) made
    by this process while `on`; with `trace`, each printed with the project's callers."""

    def __init__(self, *, trace: bool = False) -> None:
        self.sql: collections.Counter[str] = collections.Counter()
        self.redis: collections.Counter[str] = collections.Counter()
        self.trace = trace
        command, pipeline = redis.Redis.execute_command, redis.client.Pipeline.execute

        def counted_command(client, *args, **kwargs):
            self._seen(self.redis, str(args[0]), f"REDIS {args[0]} {str(args[1:2])[:40]}")
            return command(client, *args, **kwargs)

        def counted_pipeline(pipe, *args, **kwargs):
            names = [c[0][0] for c in pipe.command_stack]
            self._seen(self.redis, "PIPELINE", f"REDIS PIPELINE {names}")
            return pipeline(pipe, *args, **kwargs)

        redis.Redis.execute_command = counted_command
        redis.client.Pipeline.execute = counted_pipeline

    def __call__(self, execute, sql, params, many, context):
        self._seen(self.sql, sql.split()[0], "SQL " + " ".join(sql.split())[:110])
        return execute(sql, params, many, context)

    def clear(self) -> None:
        self.sql.clear()
        self.redis.clear()

    def _seen(self, counter, key: str, line: str) -> None:
        counter[key] += 1
        if self.trace:
            project = [
                f"{Path(f.filename).relative_to(ROOT)}:{f.lineno}:{f.name}"
                for f in traceback.extract_stack()[:-2]
                if f.filename.startswith(str(ROOT)) and "/.venv/" not in f.filename
                and not f.filename.endswith("bench/run_cpu.py")
            ]  # fmt: skip
            print(f"{line} | {' < '.join(reversed(project[-3:]))}")


def runs_posted(n: int) -> tuple[int, list[Run]]:
    """`n` runs waiting for a worker, one per session, of a fresh user's project."""
    user = get_user_model().objects.create(username=f"bench-run-{uuid.uuid4().hex[:6]}")
    project = Project.objects.create(owner=user, name="bench")
    agent = Agent.objects.create(
        project=project, name="a", model="bench-model", params={"top_k": 2}
    )
    runs = []
    for session in ChatSession.objects.bulk_create(
        ChatSession(project=project, agent=agent) for _ in range(n)
    ):
        session = ChatSession.objects.select_related("agent", "project").get(id=session.id)
        _asked, answer = message_send(session=session, content="hello there?")
        runs.append(Run.objects.select_related("session").get(message=answer))
    return user.id, runs


def run(user_id: int, r: Run) -> None:
    run_agent.run(
        user_id=user_id, project_id=str(r.session.project_id), run_id=str(r.id), attempt=r.attempt
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=50, help="runs timed per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--profile", action="store_true",
        help="cProfile one more round: the busiest calls, and own time by package",
    )  # fmt: skip
    parser.add_argument("--top", type=int, default=50)
    parser.add_argument("--dump", help="write the cProfile stats to this file too")
    parser.add_argument(
        "--statements", action="store_true",
        help="print every SQL statement and Redis command of one run, with its callers",
    )  # fmt: skip
    opts = parser.parse_args()
    call_command("migrate", verbosity=0)
    get_redis().flushdb()
    counted = Counted()
    medians, sql, commands, cpu = [], collections.Counter(), collections.Counter(), []
    for _ in range(opts.rounds):
        user_id, runs = runs_posted(WARM + opts.runs)
        for r in runs[:WARM]:
            run(user_id, r)
        counted.clear()
        round_cpu = []
        with connection.execute_wrapper(counted):
            for r in runs[WARM:]:
                started = time.process_time()
                run(user_id, r)
                round_cpu.append(time.process_time() - started)
        ended = Run.objects.filter(id__in=[r.id for r in runs]).values_list("status", flat=True)
        assert set(ended) == {Run.Status.DONE}, set(ended)
        medians.append(statistics.median(round_cpu) * 1e3)
        cpu += round_cpu
        sql.update(counted.sql)
        commands.update(counted.redis)
    per_run = opts.runs * opts.rounds
    fmt = lambda v: " / ".join(f"{x:.1f}" for x in (min(v), statistics.median(v), max(v)))  # noqa: E731
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{opts.rounds} rounds of {opts.runs} runs, min / median / max")
    print(f"CPU per run, each round's median (ms): {fmt(medians)}")
    print(f"CPU per run, every run (ms): {fmt([c * 1e3 for c in cpu])}")
    print(
        f"SQL statements per run: {sum(sql.values()) / per_run:.2f} "
        + str({k: round(v / per_run, 2) for k, v in sql.most_common()})
    )
    print(
        f"Redis commands per run: {sum(commands.values()) / per_run:.2f} "
        + str({k: round(v / per_run, 2) for k, v in commands.most_common()})
    )
    if opts.statements:
        user_id, runs = runs_posted(2)
        run(user_id, runs[0])
        counted.trace = True
        with connection.execute_wrapper(counted):
            run(user_id, runs[1])
        counted.trace = False
    if opts.profile:
        user_id, runs = runs_posted(WARM + opts.runs)
        for r in runs[:WARM]:
            run(user_id, r)
        with cProfile.Profile(time.process_time) as profiler:  # CPU, not waits
            for r in runs[WARM:]:
                run(user_id, r)
        stats = pstats.Stats(profiler).sort_stats("cumulative")
        stats.print_stats(opts.top)
        if opts.dump:
            stats.dump_stats(opts.dump)
        print("CPU per run by package (own time, under the profiler: about twice the real)")
        for package, seconds in by_package(stats).most_common(15):
            print(f"  {package:32} {seconds / opts.runs * 1e3:7.2f} ms")


def by_package(stats: pstats.Stats) -> collections.Counter[str]:
    """Own time by where the code lives: a site-package, an app of the project, the
    standard library, or built-ins."""
    seconds: collections.Counter[str] = collections.Counter()
    for (filename, _line, _name), (_cc, _nc, own, _cum, _callers) in stats.stats.items():
        if "site-packages/" in filename:
            package = filename.split("site-packages/")[1].split("/")[0]
        elif filename.startswith(str(ROOT)):
            package = "app: " + Path(filename).relative_to(ROOT).parts[0]
        elif filename == "~":
            package = "built-ins"
        else:
            package = "standard library"
        seconds[package] += own
    return seconds


if __name__ == "__main__":
    try:
        main()
    finally:
        fake.stop()
