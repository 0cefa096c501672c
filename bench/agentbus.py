"""AgentBus benchmark, end to end: what users of the bus get against plain Celery.

    REDIS_URL=redis://127.0.0.1:6379/13 .venv/bin/python bench/agentbus.py [--rounds 3]

Real Redis (REDIS_URL; the bench FLUSHES that database, so give it one of its own),
real worker processes started the way the Procfile starts them, and the publisher
running while the worker consumes (nothing is queued ahead).

1. Throughput: N no-op tasks published as fast as one publisher thread can while one
   worker (prefork, 2 processes) consumes them; tasks/s from the first publish to the
   last task's end. Each round runs every configuration paired with a plain Celery
   baseline (a plain task, one queue, kombu's own channel, a worker started the same
   way) right before it; the table gives the per-round ratio to that baseline as
   min / median / max over the rounds.
   - lean: `--loglevel=WARNING`, task events off;
   - Procfile: the Procfile's worker line as it is (`--loglevel=INFO`, task events on,
     `-Q uws.maintenance`);
   - bus with 1, 100 and 1,000 active projects (tasks spread over their queues), and
     100 active right after 10,000 workspaces were initialised through the real code
     (projects that exist, `get_worker_space`), as a platform sees after a busy hour.
2. Worker start: a worker started while 10,000 projects are active, from process
   start to its first task (the task published at once), against the same with none
   active.
3. Cold first task while following 10,000 queues: publish to a project never seen,
   to the task's start (the queue is marked active, announced, followed, polled).

Not measured here: real agent work (see bench/chat.py and bench/concurrency.py), more
than one worker, and a Redis on another host (loopback round trips are ~50 us).
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
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if __name__ == "__main__":
    sys.path[:0] = [str(ROOT)]
    os.environ.setdefault("REDIS_URL", "redis://127.0.0.1:6379/13")
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.local")
    os.environ.setdefault("DEBUG", "false")
    os.environ.setdefault("VAR_DIR", str(ROOT / "var" / "bench"))
    os.environ.setdefault("DATABASE_URL", f"sqlite:///{ROOT}/var/bench/agentbus.sqlite3")
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    os.environ["CELERY_BROKER_URL"] = os.environ["REDIS_URL"]
    import django

    django.setup()

from celery import shared_task  # noqa: E402

from agentbus import AgentBusTask, publish  # noqa: E402
from agentbus.active import mark_active  # noqa: E402
from common.redis import get_redis  # noqa: E402

DONE = "bench:done"
FIRST = "bench:first"
LAST = "bench:last"
STARTS = "bench:starts"
BASELINE_QUEUE = "bench.baseline"


def _finish(tag: str | None, of: int) -> None:
    """What a benchmark task does: one INCR, and a timestamp for the last of a run of
    `of` tasks (or, for a measured task, when it started)."""
    client = get_redis()
    if tag:
        client.hset(STARTS, tag, time.time())
        return
    if client.incr(DONE) == of:
        client.set(LAST, time.time())


@shared_task(name="bench.noop", ignore_result=True)
def noop(tag: str | None = None, of: int = 0) -> None:
    _finish(tag, of)


@shared_task(base=AgentBusTask, bind=True, name="bench.agent_noop", ignore_result=True)
def agent_noop(self, *, project_id: str, tag: str | None = None, of: int = 0) -> None:
    _finish(tag, of)


# --- workers ----------------------------------------------------------------------------------

PROCFILE_WORKER = ["--loglevel=INFO", "--concurrency=2", "-Q", "uws.maintenance"]
LEAN_WORKER = [
    "--loglevel=WARNING", "--concurrency=2", "-Q", "uws.maintenance",
    "--without-mingle", "--without-gossip", "--without-heartbeat",
]  # fmt: skip


class Worker:
    """A `celery -A config worker` process; `style` is "procfile" or "lean"."""

    def __init__(self, style: str, *, baseline: bool = False, log: Path | None = None):
        args = list(PROCFILE_WORKER if style == "procfile" else LEAN_WORKER)
        # The worker imports this file as `bench.agentbus` (`agentbus` is the app).
        env = dict(os.environ, PYTHONPATH=str(ROOT), REMAP_SIGTERM="SIGQUIT")
        env["CELERY_WORKER_SEND_TASK_EVENTS"] = "true" if style == "procfile" else "false"
        if baseline:  # plain Celery: its own queue, kombu's own Redis channel
            args[args.index("-Q") + 1] = BASELINE_QUEUE
            args += ["--agentbus-mode", "dedicated"]
            env["AGENTBUS_WORKER_TRANSPORT"] = ""
        self.started = time.time()
        out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "config", "worker", "-I", "bench.agentbus",
             "-n", f"bench-{uuid.uuid4().hex[:6]}@%h", *args],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.005)
    raise SystemExit(f"timed out waiting for {what}")


def fresh_db() -> None:
    get_redis().flushdb()


def timed_task(project_id: uuid.UUID | None, timeout: float = 60) -> float:
    """Publish one task (a project's, or the baseline's); seconds to its start."""
    tag = uuid.uuid4().hex
    sent = time.time()
    if project_id is None:
        noop.apply_async(kwargs={"tag": tag}, queue=BASELINE_QUEUE)
    else:
        publish(agent_noop, project_id=project_id, kwargs={"tag": tag})
    started = wait_until(lambda: get_redis().hget(STARTS, tag), timeout, "a measured task")
    return float(started) - sent


# --- 1. throughput ----------------------------------------------------------------------------


def throughput(style: str, total: int, active: int | None, *, workspaces: int = 0) -> float:
    """Tasks/s with the publisher and the worker running together. `active` None is the
    plain Celery baseline; `workspaces` initialises that many real workspaces first."""
    fresh_db()
    if workspaces:
        initialise_workspaces(workspaces)
    projects = [uuid.uuid4() for _ in range(active or 0)]
    for project in projects:
        mark_active(project)
    worker = Worker(style, baseline=active is None)
    try:
        # Warm: the worker is up and follows every queue before the clock starts.
        for project in projects[:1] or [None]:
            timed_task(project)
        if projects:
            wait_until(lambda: worker_follows(len(projects)), 60, "the worker following")
        get_redis().delete(DONE, LAST)
        first = time.time()
        for i in range(total):
            if projects:
                publish(agent_noop, project_id=projects[i % len(projects)], kwargs={"of": total})
            else:
                noop.apply_async(kwargs={"of": total}, queue=BASELINE_QUEUE)
        last = float(wait_until(lambda: get_redis().get(LAST), 600, "the run to finish"))
    finally:
        worker.stop()
    return total / (last - first)


def worker_follows(n: int) -> bool:
    """Whether a shared worker answered that it follows n project queues (the status
    command of agentbus.worker)."""
    from agentbus.active import STATUS_COMMAND
    from config.celery_app import app

    for reply in app.control.broadcast(STATUS_COMMAND, reply=True, timeout=0.5):
        for status in reply.values():
            if len(status.get("queues", [])) >= n:
                return True
    return False


def initialise_workspaces(n: int) -> None:
    """n projects that exist, each with one agent, and their workspaces initialised by
    the real code (what first use does)."""
    from django.contrib.auth import get_user_model

    from agents.models import Agent
    from projects.models import Project
    from workspaces.manager import get_worker_space, get_worker_space_manager

    owner, _ = get_user_model().objects.get_or_create(username="bench-owner")
    Project.objects.filter(owner=owner).delete()
    projects = Project.objects.bulk_create(
        Project(owner=owner, name=f"bench {i}") for i in range(n)
    )
    Agent.objects.bulk_create(Agent(project=p, name="a", model="offline") for p in projects)
    for project in projects:
        get_worker_space(user_id=owner.pk, project_id=project.id)
    get_worker_space_manager().forget_all_unsafe()


# --- 2. worker start and 3. cold first task ----------------------------------------------------


def worker_start(active: int, samples: int) -> list[float]:
    """Seconds from starting a worker, with `active` queues active, to its first task."""
    times = []
    for _ in range(samples):
        fresh_db()
        projects = [uuid.uuid4() for _ in range(active)]
        pipe = get_redis().pipeline(transaction=False)
        from agentbus.active import ACTIVE_KEY
        from agentbus.queues import project_queue

        now = time.time()
        for project in projects:
            pipe.zadd(ACTIVE_KEY, {project_queue(project): now})
        pipe.execute()
        target = projects[len(projects) // 2] if projects else uuid.uuid4()
        worker = Worker("lean")
        try:
            tag = uuid.uuid4().hex
            publish(agent_noop, project_id=target, kwargs={"tag": tag})
            started = wait_until(
                lambda tag=tag: get_redis().hget(STARTS, tag), 120, "the first task"
            )
            times.append(float(started) - worker.started)
        finally:
            worker.stop()
    return times


def cold_start(followed: int, samples: int) -> list[float]:
    fresh_db()
    for _ in range(followed):
        mark_active(uuid.uuid4())
    worker = Worker("lean")
    try:
        timed_task(uuid.uuid4(), timeout=120)  # the worker is up and polling
        wait_until(lambda: worker_follows(followed), 120, "the worker following")
        return [timed_task(uuid.uuid4()) for _ in range(samples)]
    finally:
        worker.stop()


# --- report -------------------------------------------------------------------------------------


def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    return " / ".join(fmt.format(v) for v in (min(values), statistics.median(values), max(values)))


def pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=5000, help="tasks per throughput run")
    parser.add_argument("--rounds", type=int, default=3, help="paired rounds per configuration")
    parser.add_argument("--workspaces", type=int, default=10_000)
    opts = parser.parse_args()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    began = time.monotonic()
    print(
        f"AgentBus end to end: Redis {os.environ['REDIS_URL']}, one worker (prefork -c 2), "
        f"{opts.tasks} tasks per run, {opts.rounds} paired rounds"
    )
    configs = [
        ("bus, 1 active (lean)", "lean", 1, 0),
        ("bus, 100 active (lean)", "lean", 100, 0),
        ("bus, 1,000 active (lean)", "lean", 1000, 0),
        ("bus, 100 active, worker as the Procfile starts it", "procfile", 100, 0),
        (
            f"bus, 100 active, {opts.workspaces:,} workspaces initialised just before",
            "lean",
            100,
            opts.workspaces,
        ),
    ]
    ratios: dict[str, list[float]] = {name: [] for name, *_ in configs}
    rates: dict[str, list[float]] = {name: [] for name, *_ in configs}
    for round_ in range(opts.rounds):
        for name, style, active, workspaces in configs:
            base = throughput(style, opts.tasks, None)
            bus = throughput(style, opts.tasks, active, workspaces=workspaces)
            ratios[name].append(bus / base)
            rates[name].append(bus)
            print(
                f"  round {round_ + 1}: {name}: {bus:.0f} tasks/s, baseline {base:.0f}: "
                f"{bus / base:.2f}x",
                flush=True,
            )

    start_none = worker_start(0, opts.rounds)
    start_many = worker_start(10_000, opts.rounds)
    cold = cold_start(10_000, 30)

    print()
    print("| configuration | ratio to plain Celery (min / median / max) | bus tasks/s (median) |")
    print("|---|---|---:|")
    for name, *_ in configs:
        print(f"| {name} | {spread(ratios[name])} | {statistics.median(rates[name]):.0f} |")
    print()
    print("| measure | min / median / max | goal |")
    print("|---|---|---|")
    print(f"| worker start to first task, 0 active | {spread(start_none)} s | |")
    print(f"| worker start to first task, 10,000 active | {spread(start_many)} s | <= 2 s |")
    print(
        f"| cold first task, following 10,000 queues | p50 {pct(cold, 50) * 1e3:.1f} ms, "
        f"p95 {pct(cold, 95) * 1e3:.1f} ms | p50 <= 10 ms |"
    )
    print(f"\n(total {time.monotonic() - began:.0f} s)")
    fresh_db()


if __name__ == "__main__":
    main()
