"""Vector storage benchmark: the shared layout (one collection per embedding model,
points filtered by tenant) against the per-agent layout (one collection per agent), at
100, 1,000 and 10,000 agents, and the operators' health at 10,000 workspaces.

    .venv/bin/python bench/vectors.py [--agents 100,1000,10000] [--rounds 3]
                                      [--searches 100] [--workspaces 10000] [--dir DIR]

For each layout and size: N agents in projects of 10, each with 20 random 384-d points,
stored through the VectorStore the workers use (embedded engines: Qdrant Edge for the
shared layout, qdrant-client's local mode for the per-agent one, in a fresh folder).

- create: one more agent's context (its 20 points, and its collection when per-agent);
  each round times 5 agents and keeps the median.
- search: k=5 nearest of a random agent, filtered to it; p50 and p95 of each round.
- project delete: every point of one project (10 agents), checked gone, as teardown does.
- open and RSS: a fresh process opens the store; seconds, and its resident memory
  afterwards (VmRSS, Django and the engine's libraries included).
- disk: what the folder holds at the end.
Timings print as "median (min-max)" over the rounds; "fill" is the one pass that builds
the data, shown for scale.

Health: 10,000 workspaces in the registry (10 of them failed) and their project rows;
GET /admin/workspaces/health through Django's test client, as staff.

Real PostgreSQL and Redis: DATABASE_URL (default postgres://postgres@127.0.0.1:5432/
uws_bench_vectors; the bench creates that database and drops it at the end) and REDIS_URL
(default redis://127.0.0.1:6379/14; FLUSHed, so give it a database of its own).

Left out: see LEFT_OUT (printed with the table).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import urlparse

import psycopg

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DB = "postgres://postgres@127.0.0.1:5432/uws_bench_vectors"
DIM, POINTS, AGENTS_PER_PROJECT, MODEL = 384, 20, 10, "bench/random-384"

LEFT_OUT = (
    "Left out: the embedding model (vectors are random, so no embedding time), the worker "
    "hop a search takes in production (Celery, Redis), a Qdrant server and its network, "
    "concurrent writers, and cold disks (each folder was just written, so opening and "
    "searching it read from the page cache)."
)

OPEN_PROBE = """
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
os.environ["DJANGO_SETTINGS_MODULE"] = "config.settings.local"
import django
django.setup()
from django.conf import settings
settings.QDRANT_PATH, settings.QDRANT_URL = sys.argv[2], ""
from context.qdrant_store import open_store

def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

before = rss_mb()
started = time.perf_counter()
store = open_store(layout=sys.argv[3]).open()
seconds = time.perf_counter() - started
print(json.dumps({"open": seconds, "rss": rss_mb(), "rss_before": before}))
store.close()
"""


def _admin_dsn(url: str) -> tuple[str, str]:
    parsed = urlparse(url)
    return parsed._replace(path="/postgres").geturl(), parsed.path.lstrip("/")


def database(url: str, *, create: bool) -> None:
    admin, name = _admin_dsn(url)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if create:
            conn.execute(f'CREATE DATABASE "{name}"')


if __name__ == "__main__":
    sys.path[:0] = [str(ROOT)]
    os.environ.setdefault("DATABASE_URL", DEFAULT_DB)
    if os.environ["DATABASE_URL"].startswith("postgres"):
        database(os.environ["DATABASE_URL"], create=True)
    from bench.harness import bootstrap

    bootstrap("vectors", QDRANT_URL="")

import numpy as np  # noqa: E402
from django.conf import settings  # noqa: E402
from django.contrib.auth import get_user_model  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.test import Client  # noqa: E402

from common.redis import get_redis  # noqa: E402
from context.chunking import point_id  # noqa: E402
from context.qdrant_store import open_store  # noqa: E402
from context.vectorstore import ContextPoint, TenantScope  # noqa: E402
from projects.models import Project  # noqa: E402
from workspaces import registry  # noqa: E402
from workspaces.redis import scoped  # noqa: E402


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def spread(values: list[float], unit: str = "ms", scale: float = 1000.0) -> str:
    scaled = [v * scale for v in values]
    fmt = "{:.2f}" if max(scaled) < 10 else "{:.1f}" if max(scaled) < 100 else "{:.0f}"
    med, low, high = (fmt.format(x) for x in (statistics.median(scaled), min(scaled), max(scaled)))
    return f"{med} ({low}-{high}) {unit}"


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


class Tenants:
    """N agents in projects of 10; users own 10 projects each."""

    def __init__(self, n: int, rng: np.random.Generator) -> None:
        self.projects: list[tuple[int, uuid.UUID]] = []
        self.agents = []
        for i in range(n):
            if i % AGENTS_PER_PROJECT == 0:
                self.projects.append((len(self.projects) // 10 + 1, uuid.uuid4()))
            user_id, project_id = self.projects[-1]
            self.agents.append(
                TenantScope.agent(user_id=user_id, project_id=project_id, agent_id=uuid.uuid4())
            )


def context_points(scope, rng: np.random.Generator) -> list:
    vectors = rng.standard_normal((POINTS, DIM), dtype=np.float32)
    return [
        ContextPoint(
            id=point_id(scope.collection, f"chunk {i}"),
            vector=vectors[i].tolist(),
            payload={"text": f"chunk {i}", "kind": "document", "metadata": {}},
        )
        for i in range(POINTS)
    ]


def bench_layout(layout: str, n: int, folder: Path, *, rounds: int, searches: int) -> dict:
    settings.QDRANT_PATH = str(folder)
    rng = np.random.default_rng(n)
    tenants = Tenants(n, rng)
    store = open_store(layout=layout).open()
    started = time.perf_counter()
    for scope in tenants.agents:
        store.upsert(scope, context_points(scope, rng), model=MODEL, dim=DIM)
    fill = time.perf_counter() - started

    create = []
    for _ in range(rounds):
        samples = []
        for _ in range(5):
            user_id, project_id = tenants.projects[int(rng.integers(len(tenants.projects)))]
            scope = TenantScope.agent(user_id=user_id, project_id=project_id, agent_id=uuid.uuid4())
            points = context_points(scope, rng)
            t0 = time.perf_counter()
            store.upsert(scope, points, model=MODEL, dim=DIM)
            samples.append(time.perf_counter() - t0)
        create.append(statistics.median(samples))

    p50, p95 = [], []
    for _ in range(rounds):
        samples = []
        for _ in range(searches):
            scope = tenants.agents[int(rng.integers(len(tenants.agents)))]
            query = rng.standard_normal(DIM, dtype=np.float32).tolist()
            t0 = time.perf_counter()
            hits = store.search(scope, query, k=5, model=MODEL, dim=DIM)
            samples.append(time.perf_counter() - t0)
            assert len(hits) == 5 and all(h.payload["agent_id"] == scope.agent_id.hex for h in hits)
        p50.append(pct(samples, 50))
        p95.append(pct(samples, 95))

    delete = []
    for project_index in range(rounds):
        user_id, project_id = tenants.projects[project_index]
        scope = TenantScope.project(user_id=user_id, project_id=project_id)
        t0 = time.perf_counter()
        store.delete_verified(scope)
        delete.append(time.perf_counter() - t0)
    store.close()

    opened = []
    for _ in range(rounds):
        probe = subprocess.run(
            [sys.executable, "-c", OPEN_PROBE, str(ROOT), str(folder), layout],
            capture_output=True,
            text=True,
            check=True,
        )
        opened.append(json.loads(probe.stdout.strip().splitlines()[-1]))
    return {
        "fill": fill,
        "create": create,
        "p50": p50,
        "p95": p95,
        "delete": delete,
        "open": [o["open"] for o in opened],
        "rss": statistics.median(o["rss"] for o in opened),
        "rss_added": statistics.median(o["rss"] - o["rss_before"] for o in opened),
        "disk": disk_bytes(folder),
    }


def bench_health(n: int, *, rounds: int, requests: int) -> dict:
    get_redis().flushdb()
    owner = get_user_model().objects.create_user("bench-owner", password="x")
    staff = get_user_model().objects.create_user("bench-staff", password="x", is_staff=True)
    projects = Project.objects.bulk_create(
        Project(owner=owner, name=f"bench {i}") for i in range(n)
    )
    for i, project in enumerate(projects):
        redis = scoped(owner.pk, project.id)
        registry.mark_initializing(redis, owner.pk, project.id)
        if i % (n // 10 or 1) == 0:
            registry.mark_error(redis, "RuntimeError: a failure for the benchmark")
        else:
            registry.mark_initialized(redis)
    # Health answers 503 here (failed workspaces, no worker): not worth a log line each.
    logging.getLogger("django.request").setLevel(logging.CRITICAL)
    client = Client()
    client.force_login(staff)
    client.get("/admin/workspaces/health")  # warm connections and code paths
    results = []
    body: dict = {}
    for _ in range(rounds):
        samples = []
        for _ in range(requests):
            t0 = time.perf_counter()
            response = client.get("/admin/workspaces/health")
            samples.append(time.perf_counter() - t0)
            body = response.json()
        results.append(statistics.median(samples))
    assert body["total_spaces"] == n and len(body["details"]) == 50, body.get("total_spaces")
    return {"median": results, "failed": body["problems"]["initialisation_failed"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--agents", default="100,1000,10000")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--searches", type=int, default=100)
    parser.add_argument("--workspaces", type=int, default=10000)
    parser.add_argument("--dir", default=None, help="where the stores are built (a temp dir)")
    args = parser.parse_args()
    sizes = [int(x) for x in args.agents.split(",")]

    call_command("migrate", verbosity=0)
    base = Path(tempfile.mkdtemp(prefix="uws-bench-vectors-", dir=args.dir))
    print(
        f"vector storage: {POINTS} random {DIM}-d points per agent, {AGENTS_PER_PROJECT} "
        f"agents per project; {args.rounds} rounds; timings: median (min-max); fill: the "
        f"one pass that builds the data; in {base}"
    )
    print(LEFT_OUT)
    results: dict[tuple[str, int], dict] = {}
    header = (
        f"{'layout':<10}{'agents':>7}  {'fill':>8}  {'create context':<22}{'search p50':<22}"
        f"{'search p95':<22}{'project delete':<24}{'open':<22}{'RSS':>8}{'(+open)':>9}"
        f"{'disk':>10}"
    )
    print(header)
    try:
        for n in sizes:
            for layout in ("shared", "per_agent"):
                folder = base / f"{layout}-{n}"
                r = bench_layout(layout, n, folder, rounds=args.rounds, searches=args.searches)
                results[(layout, n)] = r
                print(
                    f"{layout:<10}{n:>7}  {r['fill']:>7.1f}s  {spread(r['create']):<22}"
                    f"{spread(r['p50']):<22}{spread(r['p95']):<22}{spread(r['delete']):<24}"
                    f"{spread(r['open'], 's', 1):<22}{r['rss']:>6.0f}MB{r['rss_added']:>7.0f}MB"
                    f"{disk_bytes(folder) / 2**20:>8.1f}MB",
                    flush=True,
                )
                shutil.rmtree(folder, ignore_errors=True)
        health = bench_health(args.workspaces, rounds=args.rounds, requests=20)
        print(
            f"health: GET /admin/workspaces/health at {args.workspaces} workspaces "
            f"({health['failed']} failed), median per round: {spread(health['median'])}"
        )
        top = max(sizes)
        if ("shared", top) in results and ("shared", min(sizes)) in results:
            s, small, p = (
                results[("shared", top)],
                results[("shared", min(sizes))],
                results[("per_agent", top)],
            )
            goals = [
                ("open <= 1 s", max(s["open"]), max(s["open"]) <= 1.0),
                (
                    f"search p95 <= 2x its value at {min(sizes)}",
                    statistics.median(s["p95"]) / statistics.median(small["p95"]),
                    statistics.median(s["p95"]) <= 2 * statistics.median(small["p95"]),
                ),
                ("project delete <= 200 ms", max(s["delete"]), max(s["delete"]) <= 0.2),
                ("RSS <= 1/5 of per-agent", s["rss"] / p["rss"], s["rss"] <= p["rss"] / 5),
                (
                    "health <= 50 ms",
                    statistics.median(health["median"]),
                    max(health["median"]) <= 0.05,
                ),
            ]
            print(f"goals, shared layout at {top} agents:")
            for name, value, met in goals:
                print(f"  {'met ' if met else 'MISSED'}  {name}  ({value:.3g})")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    try:
        main()
    finally:
        from django.db import connections

        connections.close_all()
        if os.environ["DATABASE_URL"].startswith("postgres"):
            database(os.environ["DATABASE_URL"], create=False)
