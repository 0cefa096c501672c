"""What a vector store call costs forwarded to the embedded store's owner, against the
same call in the owner (context.store_owner).

Two processes on one embedded folder, as two workers run: the **owner** (it holds the
lease, opens the folder and serves) and a **client** (its `get_vector_store()` is a
`RemoteStore`). The shared collection holds `--agents` agents of `--points` points each
(random unit vectors at the bundled embedder's dimension, a few words of text each, so
hybrid search has terms). Each round, the owner times `--searches` searches of one agent
on its own store, then the client times the same searches forwarded, then both time
`--upserts` one-point upserts (what a run stores after its answer). Per round: p50 and
p95 in ms; the table gives min / median / max over rounds, and the load average.

Settings it changes: VAR_DIR=var/bench-store-forward, the offline engines (harness
`offline`), LOG_LEVEL=WARNING. Redis: REDIS_URL, or a Redis of its own.

    bin/with-redis --ephemeral -- .venv/bin/python bench/store_forward.py --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if __name__ == "__main__":
    sys.path[:0] = [str(ROOT)]
    from bench.harness import bootstrap

    bootstrap("store-forward", offline=True)

from common.redis import get_redis  # noqa: E402
from context.vectorstore import TenantScope  # noqa: E402

WORDS = "cat rack invoice office server month paid sleeps wiki page river stone lamp".split()


def _scope(n: int):
    return TenantScope.agent(user_id=1, project_id=uuid.UUID(int=1), agent_id=uuid.UUID(int=n + 1))


def _vector(rng: random.Random, dim: int) -> list[float]:
    v = [rng.gauss(0, 1) for _ in range(dim)]
    norm = sum(x * x for x in v) ** 0.5
    return [x / norm for x in v]


def _text(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(12))


def child(role: str, agents: int, points: int) -> None:
    """A process of the bench: answers `search MODE N SEED` and `upsert N SEED` with its
    latencies in ms (one JSON line each), until `quit`."""
    # in the child processes only (--role): the parent never opens the store
    from context.embeddings import get_embedder
    from context.qdrant_store import VectorStore
    from context.vectorstore import ContextPoint, get_vector_store

    embedder = get_embedder()
    model, dim = embedder.name, embedder.dim
    store = get_vector_store()
    if (role == "owner") != isinstance(store, VectorStore):
        raise SystemExit(f"the {role} got {type(store).__name__}")
    if role == "owner":
        rng = random.Random(7)
        for a in range(agents):
            batch = [
                ContextPoint(
                    str(uuid.UUID(int=(a << 32) + i)), _vector(rng, dim), {"text": _text(rng)}
                )
                for i in range(points)
            ]
            for i in range(0, len(batch), 256):
                store.upsert(_scope(a), batch[i : i + 256], model=model, dim=dim)
    print("ready", flush=True)
    for line in sys.stdin:
        command, *args = line.split()
        if command == "quit":
            break
        took = []
        if command == "search":
            mode, n, seed = args[0], int(args[1]), int(args[2])
            rng = random.Random(seed)
            for _ in range(n):
                vector, query = _vector(rng, dim), _text(rng)
                started = time.perf_counter()
                store.search(_scope(0), vector, k=5, model=model, dim=dim, query=query, mode=mode,
                             prefetch=20)  # fmt: skip
                took.append((time.perf_counter() - started) * 1000)
        elif command == "upsert":
            n, seed = int(args[0]), int(args[1])
            rng = random.Random(seed)
            for _ in range(n):
                point = ContextPoint(str(uuid.uuid4()), _vector(rng, dim), {"text": _text(rng)})
                started = time.perf_counter()
                store.upsert(_scope(1), [point], model=model, dim=dim)
                took.append((time.perf_counter() - started) * 1000)
        print(json.dumps(took), flush=True)
    store.close()


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def spread(values: list[float]) -> str:
    return " / ".join(f"{v:.2f}" for v in (min(values), statistics.median(values), max(values)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--searches", type=int, default=300)
    parser.add_argument("--upserts", type=int, default=100)
    parser.add_argument("--agents", type=int, default=20)
    parser.add_argument("--points", type=int, default=500)
    parser.add_argument("--role", choices=("owner", "client"))
    options = parser.parse_args()
    if options.role:
        child(options.role, options.agents, options.points)
        return
    folder = Path(os.environ["VAR_DIR"]) / "qdrant"
    shutil.rmtree(folder, ignore_errors=True)
    env = dict(os.environ, QDRANT_PATH=str(folder))

    get_redis().flushdb()
    base = [
        sys.executable,
        __file__,
        "--agents",
        str(options.agents),
        "--points",
        str(options.points),
    ]
    procs = {}
    for role in ("owner", "client"):  # the owner first: it takes the lease
        proc = subprocess.Popen(
            [*base, "--role", role], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True, cwd=ROOT,
        )  # fmt: skip
        if proc.stdout.readline().strip() != "ready":
            raise SystemExit(f"the {role} did not start")
        procs[role] = proc

    def ask(role: str, command: str) -> list[float]:
        procs[role].stdin.write(command + "\n")
        procs[role].stdin.flush()
        return json.loads(procs[role].stdout.readline())

    figures: dict[tuple[str, str], list[tuple[float, float]]] = {}
    loads = []
    print(f"{options.agents} agents x {options.points} points; {options.searches} searches and "
          f"{options.upserts} upserts per round and process")  # fmt: skip
    for r in range(options.rounds):
        for what in ("search dense", "search hybrid", "upsert"):
            n = options.upserts if what == "upsert" else options.searches
            for role in ("owner", "client") if r % 2 == 0 else ("client", "owner"):
                took = ask(role, f"{what} {n} {r}")
                figures.setdefault((what, role), []).append((pct(took, 0.5), pct(took, 0.95)))
        loads.append(os.getloadavg()[0])
        print(f"round {r + 1}: load {loads[-1]:.1f}", flush=True)
    for proc in procs.values():
        proc.stdin.write("quit\n")
        proc.stdin.flush()
        proc.wait(30)
    print("\n| call | where | p50 ms (min / median / max) | p95 ms (min / median / max) |")
    print("|---|---|---|---|")
    for (what, role), rows in figures.items():
        where = "in the owner" if role == "owner" else "forwarded"
        print(f"| {what} | {where} | {spread([p50 for p50, _ in rows])} | "
              f"{spread([p95 for _, p95 in rows])} |")  # fmt: skip
    print(f"\nload average (1 min) after each round: {', '.join(f'{x:.1f}' for x in loads)}")


if __name__ == "__main__":
    main()
