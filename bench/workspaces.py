"""Workspaces benchmark: the cached fast path, cold initialisation, memory per cached
workspace, and teardown of a busy project.

    .venv/bin/python bench/workspaces.py [--cached N] [--cold N] [--memory N] [--teardowns N]
        [--rounds 3]

Real PostgreSQL and Redis: DATABASE_URL (default postgres://postgres@127.0.0.1:5432/
uws_bench_workspaces; the bench creates that database and drops it at the end) and
REDIS_URL (without it, a Redis of the bench's own; FLUSHed before and after, so give it a
database of its own). Vector context lives in a temporary embedded Qdrant folder.
Measures 1-3 run --rounds times (min / median / max of each round's figure); measure 4
is --teardowns projects, each a round of its own.

1. Cached `get_or_create`: a warm workspace asked for N times (timed one by one).
2. Cold initialisation: N new projects with 10 agents each, first `get_worker_space`
   (project check, agents query, Redis lock, cache fill).
3. Memory per cached workspace: tracemalloc, N initialised workspaces re-attached
   into an empty manager (the handles this process keeps, nothing transient).
4. Teardown: a project with 10 agents, their vector context and 1,000 queued
   agent tasks; from `project_delete` to the teardown task done on a real worker
   (in-process, threads), then a check that nothing is left (keys under the prefix,
   queue, active set, registry index, collections).
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import sys
import tempfile
import time
import tracemalloc
import uuid
from pathlib import Path
from urllib.parse import urlparse

import psycopg

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DB = "postgres://postgres@127.0.0.1:5432/uws_bench_workspaces"


def _admin_dsn(url: str) -> tuple[str, str]:
    parsed = urlparse(url)
    return parsed._replace(path="/postgres").geturl(), parsed.path.lstrip("/")


def create_database(url: str) -> None:
    admin, name = _admin_dsn(url)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')


def drop_database(url: str) -> None:
    admin, name = _admin_dsn(url)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    sys.path[:0] = [str(ROOT)]
    os.environ.setdefault("DATABASE_URL", DEFAULT_DB)
    if os.environ["DATABASE_URL"].startswith("postgres"):
        create_database(os.environ["DATABASE_URL"])
    from bench.harness import bootstrap

    bootstrap("workspaces", QDRANT_URL="", QDRANT_PATH=tempfile.mkdtemp(prefix="uws-bench-qdrant-"))

from celery import shared_task  # noqa: E402
from celery.contrib.testing.worker import start_worker  # noqa: E402
from django.contrib.auth import get_user_model  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.db import connection, connections  # noqa: E402

from agentbus import AgentBusTask, publish, queue_depth  # noqa: E402
from agentbus.active import active_queues  # noqa: E402
from agentbus.queues import MAINTENANCE_QUEUE, project_queue  # noqa: E402
from agents.models import Agent  # noqa: E402
from common.redis import get_redis  # noqa: E402
from config.celery_app import app  # noqa: E402
from context.embeddings import get_embedder  # noqa: E402
from context.vectorstore import (  # noqa: E402
    ContextPoint,
    TenantScope,
    close_vector_store,
    get_vector_store,
)
from projects.models import Project  # noqa: E402
from projects.services import project_delete  # noqa: E402
from workspaces import registry  # noqa: E402
from workspaces.manager import get_worker_space, get_worker_space_manager  # noqa: E402
from workspaces.models import WorkspaceTeardown  # noqa: E402
from workspaces.redis import workspace_prefix  # noqa: E402


@shared_task(base=AgentBusTask, bind=True, name="bench.workspaces.noop")
def noop(self, *, user_id: int, project_id: str) -> None:
    pass


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def make_project(owner, *, agents: int = 10):
    project = Project.objects.create(owner=owner, name=f"bench {time.perf_counter_ns()}")
    Agent.objects.bulk_create(
        Agent(project=project, name=f"agent-{i}", system_prompt="You help.", model="offline")
        for i in range(agents)
    )
    return project


def spread(rounds: list[dict], key: str) -> str:
    values = [r[key] for r in rounds]
    return f"{min(values):.2f} / {statistics.median(values):.2f} / {max(values):.2f}"


def bench_cached(owner, n: int) -> dict:
    project = make_project(owner)
    get_worker_space(user_id=owner.pk, project_id=project.id)
    project_id, user_id = project.id, owner.pk
    clock = time.perf_counter_ns
    samples = []
    for _ in range(n):
        t0 = clock()
        get_worker_space(user_id=user_id, project_id=project_id)
        samples.append((clock() - t0) / 1000)
    return {"p50": pct(samples, 50), "p99": pct(samples, 99), "n": n}


def bench_cold(owner, n: int) -> dict:
    projects = [make_project(owner) for _ in range(n + 5)]
    for project in projects[:5]:  # warm connections and code paths
        get_worker_space(user_id=owner.pk, project_id=project.id)
    samples = []
    for project in projects[5:]:
        t0 = time.perf_counter()
        space = get_worker_space(user_id=owner.pk, project_id=project.id)
        samples.append((time.perf_counter() - t0) * 1000)
        assert space.initialized_here and len(space.agent_ids) == 10
    return {"p50": pct(samples, 50), "p99": pct(samples, 99), "n": n}


def bench_memory(owner, n: int) -> dict:
    projects = [make_project(owner, agents=10) for _ in range(n)]
    manager = get_worker_space_manager()
    for project in projects:
        get_worker_space(user_id=owner.pk, project_id=project.id)
    ids = [(owner.pk, p.id) for p in projects]
    manager.forget_all_unsafe()
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    for user_id, project_id in ids:
        get_worker_space(user_id=user_id, project_id=project_id)
    gc.collect()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    grown = sum(s.size_diff for s in after.compare_to(before, "filename"))
    assert len(manager.spaces()) == n
    return {"bytes": grown / n, "n": n}


def bench_teardown(owner, rounds: int) -> list[dict]:
    store, client = get_vector_store(), get_redis()
    results = []
    # A dedicated worker on the maintenance queue only: the project queues stay as they
    # are (1,000 tasks waiting) until the teardown purges them.
    with start_worker(
        app,
        pool="threads",
        concurrency=2,
        queues=[MAINTENANCE_QUEUE],
        agentbus_mode="dedicated",
        perform_ping_check=False,
        loglevel="WARNING",
        shutdown_timeout=30,
    ):
        for _ in range(rounds):
            project = make_project(owner)
            space = get_worker_space(user_id=owner.pk, project_id=project.id)
            embedder = get_embedder()
            scope = TenantScope.project(user_id=owner.pk, project_id=project.id)
            for agent_id in sorted(space.agent_ids):
                agent = TenantScope.agent(
                    user_id=owner.pk, project_id=project.id, agent_id=agent_id
                )
                point = ContextPoint(str(uuid.uuid4()), [1.0] * embedder.dim, {"text": "bench"})
                store.upsert(agent, [point], model=embedder.name, dim=embedder.dim)
            for _ in range(1000):
                publish(noop, project_id=project.id, kwargs={"user_id": owner.pk})
            queued = queue_depth(project.id)
            collections = store.count(scope)  # one point per agent
            project_id = project.id

            t0 = time.perf_counter()
            project_delete(project=project)
            t_delete = time.perf_counter() - t0
            row = None
            while True:
                row = WorkspaceTeardown.objects.filter(project_id=project_id).first()
                if row is not None and row.status == WorkspaceTeardown.Status.DONE:
                    break
                if time.perf_counter() - t0 > 60:
                    raise RuntimeError("teardown did not finish in 60 s")
                time.sleep(0.001)
            total = time.perf_counter() - t0

            left = {
                "keys": len(list(client.scan_iter(workspace_prefix(owner.pk, project_id) + "*"))),
                "queued": queue_depth(project_id),
                "queue key": client.exists(project_queue(project_id)),
                "active": int(project_queue(project_id) in active_queues()),
                "index": int((owner.pk, project_id) in registry.index_members()),
                "collections": store.count(scope),
            }
            results.append(
                {
                    "queued": queued,
                    "collections": collections,
                    "delete_ms": t_delete * 1000,
                    "total_ms": total * 1000,
                    "task_ms": (row.completed_at - row.last_attempt_at).total_seconds() * 1000,
                    "purged": row.purged_tasks,
                    "left": left,
                }
            )
    for cached in ("queues", "router", "default_queue"):
        app.amqp.__dict__.pop(cached, None)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cached", type=int, default=200_000)
    parser.add_argument("--cold", type=int, default=200)
    parser.add_argument("--memory", type=int, default=1000)
    parser.add_argument("--teardowns", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    db_url = os.environ["DATABASE_URL"]

    get_redis().flushdb()
    try:
        call_command("migrate", verbosity=0)
        owner = get_user_model().objects.create(username="bench")
        cached, cold, memory = [], [], []
        for _ in range(args.rounds):
            cached.append(bench_cached(owner, args.cached))
            cold.append(bench_cold(owner, args.cold))
            memory.append(bench_memory(owner, args.memory))
        teardowns = bench_teardown(owner, args.teardowns)
    finally:
        close_vector_store()
        shutil.rmtree(os.environ["QDRANT_PATH"], ignore_errors=True)
        get_redis().flushdb()
        connections.close_all()
        if db_url.startswith("postgres"):
            drop_database(db_url)

    print()
    print(
        f"Workspaces benchmark ({connection.vendor}, Redis {os.environ['REDIS_URL']}, "
        f"{args.rounds} rounds: min / median / max; load {os.getloadavg()[0]:.1f})"
    )
    print()
    print("| measurement | result | goal |")
    print("|---|---|---|")
    print(
        f"| cached get_or_create (n={args.cached:,} per round) | "
        f"p50 {spread(cached, 'p50')} µs, p99 {spread(cached, 'p99')} µs | p50 ≤ 50 µs |"
    )
    print(
        f"| cold initialisation, 10 agents (n={args.cold} per round) | "
        f"p50 {spread(cold, 'p50')} ms, p99 {spread(cold, 'p99')} ms | p50 ≤ 20 ms |"
    )
    kib = [{"kib": m["bytes"] / 1024} for m in memory]
    print(
        f"| memory per cached workspace (n={args.memory:,}, 10 agents each) | "
        f"{spread(kib, 'kib')} KiB | — |"
    )
    totals = [t["total_ms"] for t in teardowns]
    tasks = [t["task_ms"] for t in teardowns]
    deletes = [t["delete_ms"] for t in teardowns]
    clean = all(not any(t["left"].values()) for t in teardowns)
    first = teardowns[0]
    print(
        f"| teardown: 10 agents with context ({first['collections']} points), {first['queued']:,} "
        f"queued tasks (n={len(teardowns)}) | delete → done p50 "
        f"{statistics.median(totals):.1f} ms (max {max(totals):.1f}); "
        f"project_delete p50 {statistics.median(deletes):.1f} ms; "
        f"task p50 {statistics.median(tasks):.1f} ms; purged {first['purged']:,} | ≤ 1 s |"
    )
    print(
        "| nothing left after teardown (keys, queue, active set, index, collections) | "
        f"{'yes' if clean else 'NO: ' + repr([t['left'] for t in teardowns])} | yes |"
    )
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
