"""AgentBus benchmark, end to end, under the traffic shapes users have, against plain Celery.

    bin/with-redis --ephemeral -- .venv/bin/python bench/agentbus.py \
        [--shapes even,sparse,zipf,burst] [--n 100,1000,10000] [--workers lean,procfile] \
        [--rounds 3] [--tasks 5000] [--burst 10000] [--no-start] [--broker redis|amqp]

`--broker amqp`: the bus runs on the RabbitMQ at 127.0.0.1:5672 (a vhost of its own per
run, made with rabbitmqctl and deleted after; TEST_AMQP_URL names another broker to use
as it is), its coordination state in REDIS_URL; the baseline stays plain Celery on Redis
(one queue), which is what the goals compare with.

Real Redis (REDIS_URL; the bench FLUSHES that database, so give it one of its own),
real worker processes, and the publisher running while the worker consumes.

1. Throughput per traffic shape, with N projects active (the shared worker follows N
   queues): `even` (tasks spread over all N), `sparse` (over 100 of the N, the rest
   idle), `zipf` (project k gets a share proportional to 1/k^1.1), and `burst` (one
   project publishes a backlog of --burst tasks, then others trickle 50 tasks/s while
   what is left of it drains; "idle" is the same trickle with no backlog). One
   publisher thread sends --tasks no-op tasks as fast as it can; tasks/s from the first
   publish to the last task's end. Each configuration is paired, in the same round,
   with plain Celery on one queue (a plain task, kombu's own channel, a worker started
   the same way, the same sequence of tasks); the table gives the per-round ratio as
   min / median / max over the rounds, and the 1-minute load average after each round.
   Waits (publish to task start) are of the small projects' tasks: in zipf the projects
   ranked below 10, in burst the trickle, measured also with no burst ("idle").
   Worker styles (each setting named here):
   - lean: prefork -c 2, `--loglevel=WARNING --without-mingle --without-gossip
     --without-heartbeat`, task events off;
   - procfile: the Procfile's worker line as it is (`--pool=threads`, its concurrency,
     `--loglevel=INFO`, its flags), with the settings' defaults (events, per-task log).
2. Worker start: a lean worker started while 10,000 projects are active, from process
   start to its first task (the task published at once), paired in each round with a
   start while none is active (the process's own start time).
3. Cold first task while following 10,000 queues: publish to a project never seen, to
   the task's start.

The machine may be shared: compare the ratios, which are paired in the same round, not
the absolute rates. Not measured here: real agent work (bench/chat.py,
bench/concurrency.py), more than one worker, a Redis on another host.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import re
import shlex
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
    from bench.harness import bootstrap

    os.environ.setdefault("DATABASE_URL", f"sqlite:///{ROOT}/var/bench-agentbus/db.sqlite3")
    bootstrap("agentbus")

from celery import shared_task  # noqa: E402
from django.conf import settings  # noqa: E402
from django.core.management import call_command  # noqa: E402
from kombu import Connection  # noqa: E402

from agentbus import AgentBusTask, publish  # noqa: E402
from agentbus.active import STATUS_COMMAND, mark_active  # noqa: E402
from agentbus.keys import ACTIVE_KEY  # noqa: E402
from agentbus.queues import project_queue  # noqa: E402
from common.redis import get_redis  # noqa: E402
from config.celery_app import app  # noqa: E402
from tests.rabbitmq import amqp_unavailable, amqp_vhost  # noqa: E402
from tests.workers import wait_until  # noqa: E402

# Where the bus runs (--broker; read before Django sets up, as the broker URL is).
BROKER = sys.argv[sys.argv.index("--broker") + 1] if "--broker" in sys.argv[:-1] else "redis"
DONE = "bench:done"
LAST = "bench:last"
STARTS = "bench:starts"
WAITS = "bench:waits"
BASELINE_QUEUE = "bench.baseline"
SHAPES = ("even", "sparse", "zipf", "burst")
# Settings given to the Procfile-style workers (--procfile-env), e.g. events back on.
PROCFILE_ENV: dict[str, str] = {}
SPARSE_BUSY = 100
ZIPF_S = 1.1
ZIPF_SMALL_RANK = 10  # zipf: projects ranked below this are the "small" ones
TRICKLE_PER_SECOND = 50


def _finish(tag: str | None, of: int, sent: float | None) -> None:
    """What a benchmark task does: one INCR and a timestamp for the last of a run of
    `of` tasks; a small project's task also records its wait; a measured task (`tag`)
    records when it started."""
    client = get_redis()
    if tag:
        client.hset(STARTS, tag, time.time())
        return
    if sent is not None:
        client.rpush(WAITS, time.time() - sent)
    if of and client.incr(DONE) == of:
        client.set(LAST, time.time())


@shared_task(name="bench.noop", ignore_result=True)
def noop(tag: str | None = None, of: int = 0, sent: float | None = None) -> None:
    _finish(tag, of, sent)


@shared_task(base=AgentBusTask, bind=True, name="bench.agent_noop", ignore_result=True)
def agent_noop(
    self, *, project_id: str, tag: str | None = None, of: int = 0, sent: float | None = None
) -> None:
    _finish(tag, of, sent)


# --- workers ----------------------------------------------------------------------------------

LEAN_WORKER = [
    "--loglevel=WARNING", "--concurrency=2", "-Q", "uws.maintenance",
    "--without-mingle", "--without-gossip", "--without-heartbeat",
]  # fmt: skip


def procfile_worker() -> list[str]:
    """The Procfile's worker line: its arguments after `celery -A config worker`, with
    ${VAR:-default} expanded from the environment."""
    line = next(x for x in (ROOT / "Procfile").read_text().splitlines() if x.startswith("worker:"))
    line = re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: os.environ.get(m.group(1), m.group(2)), line)
    words = shlex.split(line.split(":", 1)[1])
    return words[words.index("worker") + 1 :]


class Worker:
    """A `celery -A config worker` process; `style` is "procfile" or "lean"."""

    def __init__(self, style: str, *, baseline: bool = False, log: Path | None = None):
        args = procfile_worker() if style == "procfile" else list(LEAN_WORKER)
        # The worker imports this file as `bench.agentbus` (`agentbus` is the app).
        env = dict(os.environ, PYTHONPATH=str(ROOT), REMAP_SIGTERM="SIGQUIT")
        if style == "procfile":
            # The settings' defaults, as `make run` has them.
            for name in ("CELERY_WORKER_SEND_TASK_EVENTS", "WORKER_LOG_EACH_TASK"):
                env.pop(name, None)
            env["LOG_LEVEL"] = "INFO"
            env.update(PROCFILE_ENV)
        else:
            env["CELERY_WORKER_SEND_TASK_EVENTS"] = "false"
            if os.environ.get("BENCH_WORKER_LOGLEVEL"):  # for looking into a run
                args[0] = f"--loglevel={os.environ['BENCH_WORKER_LOGLEVEL']}"
        if baseline:  # plain Celery: its own queue, kombu's own Redis channel
            args[args.index("-Q") + 1] = BASELINE_QUEUE
            args += ["--agentbus-mode", "dedicated"]
            env["AGENTBUS_WORKER_TRANSPORT"] = ""
            env["CELERY_BROKER_URL"] = os.environ["REDIS_URL"]
        else:
            env["CELERY_BROKER_URL"] = bus_broker_url()
        self.started = time.time()
        if log is None and os.environ.get("BENCH_WORKER_LOG_DIR"):  # for looking into a run
            log = Path(os.environ["BENCH_WORKER_LOG_DIR"]) / f"{uuid.uuid4().hex[:6]}.log"
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


def fresh_db() -> None:
    get_redis().flushdb()


# --- the broker -------------------------------------------------------------------------------

_vhost: contextlib.ExitStack | None = None
_bus_url = os.environ.get("REDIS_URL", "")
_baseline_producer = None


def bus_broker_url() -> str:
    return _bus_url


def point_app_at(url: str) -> None:
    """This process's publishing and control go to `url` (tests.workers.broker_at's
    resets, kept for the run)."""
    global _bus_url
    _bus_url = url
    os.environ["CELERY_BROKER_URL"] = url  # Celery reads it before its own settings
    settings.CELERY_BROKER_URL = url
    app.conf.broker_url = url
    app._pool = None
    app.amqp._producer_pool = None
    app.__dict__.pop("control", None)


def fresh_vhost() -> None:
    """A RabbitMQ vhost of the bench's own (deleted at the end; `remove_queues` empties
    it between runs: deleting a vhost can take minutes on a loaded machine)."""
    global _vhost
    _vhost = contextlib.ExitStack()
    point_app_at(_vhost.enter_context(amqp_vhost("uws_bench")))


def remove_queues(projects: list[uuid.UUID]) -> None:
    """Delete the projects' RabbitMQ queues after a run (pipelined)."""
    if BROKER != "amqp" or not projects:
        return

    with Connection(bus_broker_url()) as conn:
        channel = conn.channel()
        for project in projects[:-1]:
            channel.queue_delete(queue=project_queue(project), nowait=True)
        channel.queue_delete(queue=project_queue(projects[-1]))


def predeclare(projects: list[uuid.UUID]) -> float:
    """Declare the projects' RabbitMQ queues, as their first publishes would have (setup,
    pipelined); returns the seconds it took."""
    began = time.monotonic()
    with Connection(bus_broker_url()) as conn:
        channel = conn.channel()
        # As agentbus.queues.direct_queue declares them (py-amqp's defaults differ).
        options = {"durable": True, "auto_delete": False}
        for project in projects[:-1]:
            channel.queue_declare(queue=project_queue(project), nowait=True, **options)
        if projects:  # the last one waits for its answer, so for all the others'
            channel.queue_declare(queue=project_queue(projects[-1]), **options)
    return time.monotonic() - began


def baseline_producer():
    """A producer on the Redis broker for plain Celery's tasks, whatever the bus runs on."""
    global _baseline_producer
    if _baseline_producer is None:
        connection = Connection(os.environ["REDIS_URL"])
        _baseline_producer = app.amqp.Producer(connection.default_channel)
    return _baseline_producer


def timed_task(project_id: uuid.UUID | None, timeout: float = 60) -> float:
    """Publish one task (a project's, or the baseline's); seconds to its start."""
    tag = uuid.uuid4().hex
    sent = time.time()
    if project_id is None:
        noop.apply_async(kwargs={"tag": tag}, queue=BASELINE_QUEUE, producer=baseline_producer())
    else:
        publish(agent_noop, project_id=project_id, kwargs={"tag": tag})
    started = wait_until(lambda: get_redis().hget(STARTS, tag), timeout, "a measured task")
    return float(started) - sent


def activate(projects: list[uuid.UUID]) -> None:
    """Mark projects active as publishing would, in pipelines (setup, not measured)."""
    client = get_redis()
    now = time.time()
    for i in range(0, len(projects), 5000):
        client.zadd(ACTIVE_KEY, {project_queue(p): now for p in projects[i : i + 5000]})


def worker_follows(n: int) -> bool:
    """Whether a shared worker answered that it follows n project queues (the status
    command of agentbus.worker)."""
    for reply in app.control.broadcast(STATUS_COMMAND, reply=True, timeout=0.5):
        for status in reply.values():
            if len(status.get("queues", [])) >= n:
                return True
    return False


# --- 1. throughput by shape --------------------------------------------------------------------


def sequence(shape: str, n: int, total: int, seed: int) -> tuple[list[int], set[int]]:
    """Which project (index among n) each task goes to, and which indexes are "small"."""
    rng = random.Random(seed)
    if shape == "even":
        return [i % n for i in range(total)], set()
    if shape == "sparse":
        busy = min(SPARSE_BUSY, n)
        return [i % busy for i in range(total)], set()
    if shape == "zipf":
        weights = [1 / (k + 1) ** ZIPF_S for k in range(n)]
        return rng.choices(range(n), weights=weights, k=total), set(range(ZIPF_SMALL_RANK, n))
    raise ValueError(shape)


class Run:
    def __init__(self, rate: float, waits: list[float], idle_waits: list[float] | None = None):
        self.rate, self.waits, self.idle_waits = rate, waits, idle_waits


def _send(projects, index: int, of: int, sent: float | None) -> None:
    kwargs = {"of": of, "sent": sent}
    if projects:
        publish(agent_noop, project_id=projects[index], kwargs=kwargs)
    else:
        noop.apply_async(kwargs=kwargs, queue=BASELINE_QUEUE, producer=baseline_producer())


def throughput(style: str, shape: str, n: int, total: int, *, baseline: bool, burst: int) -> Run:
    """One run: tasks/s and the small projects' waits. `baseline`: plain Celery, every
    task on one queue in the same order."""
    fresh_db()
    projects = [uuid.uuid4() for _ in range(n)]
    if not baseline:
        activate(projects)
        if BROKER == "amqp":
            predeclare(projects)
    worker = Worker(style, baseline=baseline)
    sendto = None if baseline else projects
    try:
        timed_task(None if baseline else projects[0], timeout=120)  # the worker is up
        if not baseline:
            wait_until(lambda: worker_follows(n), 120, "the worker following")
        if shape == "burst":
            return _burst(sendto, n, burst)
        order, small = sequence(shape, n, total, seed=n)
        get_redis().delete(DONE, LAST, WAITS)
        first = time.time()
        for index in order:
            _send(sendto, index, total, time.time() if index in small else None)
        last = float(wait_until(lambda: get_redis().get(LAST), 600, "the run to finish"))
        return Run(total / (last - first), _waits())
    finally:
        worker.stop()
        if not baseline:
            remove_queues(projects)


def _waits() -> list[float]:
    return [float(w) for w in get_redis().lrange(WAITS, 0, -1)]


def _trickle(sendto, n: int, until) -> int:
    """Small projects (every one but the first) each sending a task now and then, from
    this thread (no other publisher competes for it), until `until()`. Returns how many."""
    rng = random.Random(7)
    sent = 0
    while not until():
        _send(sendto, rng.randrange(1, n) if n > 1 else 0, 0, time.time())
        sent += 1
        time.sleep(1 / TRICKLE_PER_SECOND)
    return sent


def _burst(sendto, n: int, burst: int) -> Run:
    client = get_redis()
    # Idle: the trickle alone, for two seconds.
    client.delete(WAITS)
    stop_at = time.monotonic() + 2
    count = _trickle(sendto, n, lambda: time.monotonic() > stop_at)
    wait_until(lambda: client.llen(WAITS) >= count, 60, "the idle trickle")
    idle = _waits()
    # The burst: one project publishes its backlog as fast as it can, then the others
    # trickle while what is left of it drains.
    client.delete(DONE, LAST, WAITS)
    first = time.time()
    for _ in range(burst):
        _send(sendto, 0, burst, None)
    count = _trickle(sendto, n, lambda: client.get(LAST))
    last = float(wait_until(lambda: client.get(LAST), 900, "the backlog to drain"))
    wait_until(lambda: client.llen(WAITS) >= count, 120, "the trickle")
    return Run(burst / (last - first), _waits(), idle)


# --- 2. worker start and 3. cold first task ----------------------------------------------------


def paired_start(active: int, samples: int) -> tuple[list[float], list[float]]:
    """`worker_start` with none and with `active` queues active, paired: one of each
    per round, in alternating order."""
    none, many = [], []
    projects = [uuid.uuid4() for _ in range(active)]
    if BROKER == "amqp":
        declared = predeclare(projects)
        print(f"  (setup: {active:,} RabbitMQ queues declared in {declared:.1f} s)", flush=True)
    try:
        for round_ in range(samples):
            for which in (0, 1) if round_ % 2 == 0 else (1, 0):
                if which:
                    many += worker_start(active, 1, projects=projects)
                else:
                    none += worker_start(0, 1)
            print(f"  round {round_ + 1}: 0 active {none[-1]:.2f} s, {active:,} active "
                  f"{many[-1]:.2f} s; load {os.getloadavg()[0]:.1f}", flush=True)  # fmt: skip
    finally:
        remove_queues(projects)
    return none, many


def worker_start(active: int, samples: int, projects: list[uuid.UUID] | None = None) -> list[float]:
    """Seconds from starting a worker, with `active` queues active, to its first task
    (`projects`: queues already declared, left in place)."""
    times = []
    given = projects is not None
    projects = projects if given else [uuid.uuid4() for _ in range(active)]
    if BROKER == "amqp" and not given:
        # Declared once for all samples (as the projects' first publishes would have):
        # creating a RabbitMQ queue is the slow part, and not what a worker start does.
        declared = predeclare(projects)
        print(f"  (setup: {active:,} RabbitMQ queues declared in {declared:.1f} s)", flush=True)
    try:
        for _ in range(samples):
            fresh_db()
            activate(projects)
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
    finally:
        if not given:
            remove_queues(projects)
    return times


def cold_start(followed: int, samples: int) -> tuple[list[float], list[float]]:
    """A task of a project never seen (announced, followed), and, for reference in the
    same conditions, a task of a project already followed and idle."""
    fresh_db()
    projects = [uuid.uuid4() for _ in range(followed)]
    for project in projects:
        mark_active(project)
    if BROKER == "amqp":
        predeclare(projects)
    worker = Worker("lean")
    try:
        timed_task(uuid.uuid4(), timeout=120)  # the worker is up and polling
        wait_until(lambda: worker_follows(followed), 120, "the worker following")
        cold, warm = [], []
        for i in range(samples):
            cold.append(timed_task(uuid.uuid4()))
            warm.append(timed_task(projects[i]))
        return cold, warm
    finally:
        worker.stop()
        remove_queues(projects)


# --- report -------------------------------------------------------------------------------------


def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    return " / ".join(fmt.format(v) for v in (min(values), statistics.median(values), max(values)))


def pct(values: list[float], q: int) -> float:
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def ms(values: list[float]) -> str:
    if not values:
        return "—"
    return f"{pct(values, 50) * 1e3:.1f} / {pct(values, 99) * 1e3:.1f}"


def main() -> None:
    try:
        run()
    finally:
        if _vhost is not None:
            _vhost.close()


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=5000, help="tasks per throughput run")
    parser.add_argument("--burst", type=int, default=10_000, help="the burst's backlog")
    parser.add_argument("--rounds", type=int, default=3, help="paired rounds per configuration")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--n", default="100,1000,10000", help="active projects")
    parser.add_argument("--workers", default="lean,procfile", help="worker styles")
    parser.add_argument("--no-start", action="store_true", help="skip worker start, cold task")
    parser.add_argument(
        "--procfile-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting for the Procfile-style workers (e.g. CELERY_WORKER_SEND_TASK_EVENTS=true)",
    )
    parser.add_argument("--start-only", action="store_true", help="only worker start, cold task")
    parser.add_argument("--broker", choices=["redis", "amqp"], default="redis")
    opts = parser.parse_args()
    if opts.broker == "amqp":
        reason = amqp_unavailable()
        if reason:
            raise SystemExit(reason)
        fresh_vhost()
    PROCFILE_ENV.update(item.split("=", 1) for item in opts.procfile_env)
    shapes = [s for s in opts.shapes.split(",") if s]
    sizes = [int(n) for n in opts.n.split(",") if n]
    styles = [w for w in opts.workers.split(",") if w]
    assert set(shapes) <= set(SHAPES) and set(styles) <= {"lean", "procfile"}

    call_command("migrate", verbosity=0)
    began = time.monotonic()
    print(
        f"AgentBus end to end: bus on {opts.broker} (coordination in Redis "
        f"{os.environ['REDIS_URL']}), baseline plain Celery on that Redis, one worker; "
        f"{opts.tasks} tasks per run (burst: {opts.burst:,} backlog + {TRICKLE_PER_SECOND}/s "
        f"trickle), {opts.rounds} paired rounds; Procfile worker: {' '.join(procfile_worker())}"
        + (f" with {PROCFILE_ENV}" if PROCFILE_ENV else "")
    )
    configs = [
        (style, shape, n)
        for style in styles
        for shape in shapes
        for n in sizes
        if not opts.start_only
    ]
    results: dict[tuple, list[tuple[Run, Run, float]]] = {c: [] for c in configs}
    for round_ in range(opts.rounds):
        for config in configs:
            style, shape, n = config
            base = throughput(style, shape, n, opts.tasks, baseline=True, burst=opts.burst)
            bus = throughput(style, shape, n, opts.tasks, baseline=False, burst=opts.burst)
            load = os.getloadavg()[0]
            results[config].append((bus, base, load))
            print(
                f"  round {round_ + 1}: {style} {shape} N={n:,}: bus {bus.rate:.0f}/s, "
                f"plain {base.rate:.0f}/s: {bus.rate / base.rate:.2f}x; small waits p50/p99 "
                f"bus {ms(bus.waits)} ms, plain {ms(base.waits)} ms"
                + (f", bus idle {ms(bus.idle_waits)} ms" if bus.idle_waits is not None else "")
                + f"; load {load:.2f}",
                flush=True,
            )

    if configs:
        print()
        print(
            "| worker | shape | N active | ratio to plain Celery (min / median / max) "
            "| bus tasks/s (median) | small waits p50 / p99 ms, bus (idle) | plain "
            "| load avg per round |"
        )
        print("|---|---|---:|---|---:|---|---|---|")
        for config in configs:
            style, shape, n = config
            runs = results[config]
            ratios = [bus.rate / base.rate for bus, base, _ in runs]
            bus_waits = [w for bus, _, _ in runs for w in bus.waits]
            base_waits = [w for _, base, _ in runs for w in base.waits]
            idle = [w for bus, _, _ in runs for w in (bus.idle_waits or [])]
            print(
                f"| {style} | {shape} | {n:,} | {spread(ratios)} | "
                f"{statistics.median(bus.rate for bus, _, _ in runs):.0f} | {ms(bus_waits)}"
                + (f" ({ms(idle)})" if idle else "")
                + f" | {ms(base_waits)} | "
                + " ".join(f"{load:.1f}" for *_, load in runs)
                + " |"
            )

    if not opts.no_start:
        start_none, start_many = paired_start(10_000, opts.rounds)
        cold, warm = cold_start(10_000, 30)
        print()
        print("| measure | min / median / max | goal |")
        print("|---|---|---|")
        print(f"| worker start to first task, 0 active | {spread(start_none)} s | |")
        goal = "<= 5 s" if opts.broker == "amqp" else "<= 2 s"
        print(f"| worker start to first task, 10,000 active | {spread(start_many)} s | {goal} |")
        ratios = [m / n for m, n in zip(start_many, start_none, strict=True)]
        print(f"| the same / 0 active, paired per round | {spread(ratios)} | |")
        print(
            f"| cold first task, following 10,000 queues | p50 {pct(cold, 50) * 1e3:.1f} ms, "
            f"p95 {pct(cold, 95) * 1e3:.1f} ms | p50 <= 10 ms |"
        )
        print(
            f"| (reference) idle followed project's task, same worker | p50 "
            f"{pct(warm, 50) * 1e3:.1f} ms, p95 {pct(warm, 95) * 1e3:.1f} ms | |"
        )
    print(f"\n(total {time.monotonic() - began:.0f} s)")
    get_redis().flushdb()


if __name__ == "__main__":
    main()
