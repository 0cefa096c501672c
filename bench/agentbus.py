"""AgentBus benchmark: throughput against plain Celery, fairness, cold start.

    REDIS_URL=redis://127.0.0.1:6379/13 .venv/bin/python bench/agentbus.py [--tasks N]

Real Redis (REDIS_URL, default redis://127.0.0.1:6379/13; the bench FLUSHes that
database between runs, so give it one of its own) and real worker processes:
`celery -A config worker -P prefork -c 2`, started afresh for every measurement.

1. Throughput: N no-op tasks are queued, then a worker drains them; tasks/s from the
   first task's start to the last one's end. Each configuration runs --rounds times
   (default 2), interleaved, and its best run is reported with all the runs.
   - baseline: plain Celery, a plain task on one queue, a worker following that queue
     with kombu's own Redis channel (run first and last);
   - AgentBus: R registered projects (agents registered on the bus), A of them active
     (the tasks are spread over their queues), agent tasks (AgentBusTask: the
     tombstone check included), a shared worker following the maintenance queue and
     the active project queues (R, A) in (10, 1) (1k, 1) (1k, 100) (1k, 1k) (10k, 1)
     (10k, 100) (10k, 1k); and (10k, 1k) once more with kombu's own channel instead of
     workspaces.transport, to show what the cached BRPOP buys.
   Workers run with task events off (Celery's default, and how the DESIGN table was
   measured: the bus's overhead shows most against the cheapest baseline); --events
   runs them with events on, as the Procfile's workers do for Flower.
2. Fairness: one project's single task, from publish to start, while another project
   has a 10,000-task backlog, against the same on an idle bus (p50/p95 of 40 tasks).
3. Cold start: from publishing a never-seen project's first task to its start (the
   queue is marked active, announced, followed, polled), p50/p95 of 30 projects.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if __name__ == "__main__":
    sys.path[:0] = [str(ROOT)]
    os.environ.setdefault("REDIS_URL", "redis://127.0.0.1:6379/13")
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.local")
    os.environ.setdefault("DEBUG", "false")
    os.environ.setdefault("VAR_DIR", str(ROOT / "var" / "bench"))
    os.environ["CELERY_BROKER_URL"] = os.environ["REDIS_URL"]
    import django

    django.setup()

from celery import shared_task  # noqa: E402

from agentbus import AgentBusTask, publish, queue_depth  # noqa: E402
from agentbus.active import active_queues, mark_active  # noqa: E402
from common.redis import get_redis  # noqa: E402
from workspaces.redis import workspace_prefix  # noqa: E402
from workspaces.registry import AGENT_CACHE_KEY  # noqa: E402

DONE = "bench:done"
FIRST = "bench:first"
LAST = "bench:last"
STARTS = "bench:starts"
BASELINE_QUEUE = "bench.baseline"
# Task events (for Flower) on or off in the workers: --events.
EVENTS = False


def _finish(tag: str | None, of: int) -> None:
    """What a benchmark task does: one INCR, and a timestamp for the first and the
    last of a run of `of` tasks (or, for a measured task, when it started)."""
    client = get_redis()
    if tag:
        client.hset(STARTS, tag, time.time())
        return
    count = client.incr(DONE)
    if count == 1:
        client.set(FIRST, time.time())
    if count == of:
        client.set(LAST, time.time())


@shared_task(name="bench.noop", ignore_result=True)
def noop(tag: str | None = None, of: int = 0) -> None:
    _finish(tag, of)


@shared_task(base=AgentBusTask, bind=True, name="bench.agent_noop", ignore_result=True)
def agent_noop(self, *, project_id: str, tag: str | None = None, of: int = 0) -> None:
    _finish(tag, of)


def send(task, *, project_id: uuid.UUID, kwargs: dict | None = None) -> str:
    return publish(task, project_id=project_id, kwargs=kwargs).id


# --- running workers ----------------------------------------------------------------------


class Worker:
    def __init__(self, *args: str, stock_transport: bool = False):
        # The worker imports this file as `bench.agentbus` (`agentbus` is the app).
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        env["CELERY_WORKER_SEND_TASK_EVENTS"] = "true" if EVENTS else "false"
        if stock_transport:  # kombu's own Redis channel, as plain Celery runs it
            env["AGENTBUS_WORKER_TRANSPORT"] = ""
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "config", "worker", "-P", "prefork",
             "-c", "2", "-I", "bench.agentbus", "--without-mingle", "--without-gossip",
             "--without-heartbeat", "--loglevel=WARNING", "-n", f"bench-{uuid.uuid4().hex[:6]}@%h",
             *args],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)


def shared_worker(stock_transport: bool = False) -> Worker:
    from agentbus.queues import MAINTENANCE_QUEUE

    return Worker("-Q", MAINTENANCE_QUEUE, stock_transport=stock_transport)


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.01)
    raise SystemExit(f"timed out waiting for {what}")


def fresh_db() -> None:
    get_redis().flushdb()


# --- 1. throughput ---------------------------------------------------------------------------


def register_projects(count: int) -> list[uuid.UUID]:
    """Projects whose workspaces hold their agents (the AgentCache a workspace's
    initialise fills)."""
    projects = [uuid.uuid4() for _ in range(count)]
    pipe = get_redis().pipeline(transaction=False)
    for i, project in enumerate(projects):
        key = workspace_prefix(1 + i % 100, project) + AGENT_CACHE_KEY
        pipe.hset(key, mapping={"agent-1": "{}", "agent-2": "{}"})
        if len(pipe) >= 1000:
            pipe.execute()
    pipe.execute()
    return projects


def drain(worker: Worker, total: int) -> float:
    """Let a worker drain what is queued; tasks/s from first start to last end."""
    try:
        client = get_redis()
        wait_until(lambda: client.get(LAST), 600, "the queue to drain")
        first, last = float(client.get(FIRST)), float(client.get(LAST))
    finally:
        worker.stop()
    return (total - 1) / (last - first)


def throughput_baseline(total: int) -> float:
    fresh_db()
    for _ in range(total):
        noop.apply_async(kwargs={"of": total}, queue=BASELINE_QUEUE)
    worker = Worker("-Q", BASELINE_QUEUE, "--agentbus-mode", "dedicated", stock_transport=True)
    return drain(worker, total)


def throughput_bus(total: int, registered: int, active: int, stock: bool = False) -> float:
    fresh_db()
    projects = register_projects(registered)[:active]
    for project in projects:
        mark_active(project)
    for i in range(total):
        send(agent_noop, project_id=projects[i % active], kwargs={"of": total})
    assert len(active_queues()) == active
    return drain(shared_worker(stock_transport=stock), total)


# --- 2. fairness and 3. cold start -----------------------------------------------------------


def timed_task(project_id: uuid.UUID) -> float:
    """Publish one task of `project_id`; seconds from publish to its start."""

    client = get_redis()
    tag = uuid.uuid4().hex
    sent = time.time()
    send(agent_noop, project_id=project_id, kwargs={"tag": tag})
    started = wait_until(lambda: client.hget(STARTS, tag), 30, "a measured task")
    return float(started) - sent


def fairness(samples: int = 40, backlog: int = 10_000) -> tuple[list[float], list[float], int]:

    fresh_db()
    quiet, busy = uuid.uuid4(), uuid.uuid4()
    mark_active(quiet)
    worker = shared_worker()
    try:
        timed_task(quiet)  # warm: the worker follows the queue
        idle = [timed_task(quiet) for _ in range(samples)]
    finally:
        worker.stop()

    for _ in range(backlog):
        send(agent_noop, project_id=busy)
    worker = shared_worker()
    client = get_redis()
    try:
        wait_until(lambda: int(client.get(DONE) or 0) >= 100, 60, "the backlog to start")
        behind = [timed_task(quiet) for _ in range(samples)]
        left = queue_depth(busy)
    finally:
        worker.stop()
    return idle, behind, left


def cold_start(samples: int = 30) -> list[float]:
    fresh_db()
    worker = shared_worker()
    try:
        timed_task(uuid.uuid4())  # the worker is up and polling
        return [timed_task(uuid.uuid4()) for _ in range(samples)]
    finally:
        worker.stop()


# --- report -------------------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def ms(values: list[float], q: float) -> str:
    return f"{pct(values, q) * 1e3:.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=5000, help="tasks per throughput run")
    parser.add_argument("--events", action="store_true", help="workers send task events")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each configuration")
    opts = parser.parse_args()
    total = opts.tasks
    global EVENTS
    EVENTS = opts.events
    started = time.monotonic()
    events = "on" if EVENTS else "off"
    print(
        f"AgentBus benchmark: Redis {os.environ['REDIS_URL']}, prefork -c 2, "
        f"{total} tasks/run, task events {events}"
    )

    # Every configuration runs `--rounds` times, interleaved (the baseline at the start
    # of each round and once more at the end), and the best run counts: on a shared
    # machine a slower run measures the neighbours, not the bus.
    configs: list[tuple[str, Callable[[], float]]] = [
        (f"AgentBus {r:>6,} registered / {a:>5,} active", partial(throughput_bus, total, r, a))
        for r, a in [
            (10, 1), (1_000, 1), (1_000, 100), (1_000, 1_000),
            (10_000, 1), (10_000, 100), (10_000, 1_000),
        ]
    ]  # fmt: skip
    configs.append(
        (
            "AgentBus 10,000 registered / 1,000 active, kombu's own channel",
            partial(throughput_bus, total, 10_000, 1_000, stock=True),
        )
    )
    baseline_name = "plain Celery, 1 queue (baseline)"
    rates: dict[str, list[float]] = {baseline_name: []}
    for round_ in range(opts.rounds):
        plan = [(baseline_name, partial(throughput_baseline, total)), *configs]
        if round_ == opts.rounds - 1:
            plan.append(plan[0])
        for name, run in plan:
            rate = run()
            rates.setdefault(name, []).append(rate)
            print(f"  {name.strip()}: {rate:.0f} tasks/s", flush=True)
    baseline = max(rates[baseline_name])

    idle, behind, left = fairness()
    cold = cold_start()

    print()
    print("| run | tasks/s (best) | ratio to baseline | all runs |")
    print("|---|---:|---:|---|")
    for name, runs in rates.items():
        best = max(runs)
        every = ", ".join(f"{r:.0f}" for r in runs)
        print(f"| {name} | {best:.0f} | {best / baseline:.2f}x | {every} |")
    print()
    print("| latency, publish to task start | p50 | p95 | goal |")
    print("|---|---:|---:|---|")
    print(f"| one task, idle bus | {ms(idle, 50)} | {ms(idle, 95)} | |")
    ratio = pct(behind, 95) / pct(idle, 95)
    print(
        f"| one task behind another project's 10,000-task backlog | {ms(behind, 50)} "
        f"| {ms(behind, 95)} | p95 <= 2x idle: {ratio:.2f}x |"
    )
    print(f"| cold project's first task | {ms(cold, 50)} | {ms(cold, 95)} | p50 <= 250 ms |")
    print()
    print(f"(backlog still queued after the fairness samples: {left}; ratios are to the best")
    print(f" baseline run; total {time.monotonic() - started:.0f} s)")
    fresh_db()


if __name__ == "__main__":
    main()
