"""Real Celery workers for the tests: one in the test process, configured exactly like
the shared pool, and `celery -A config worker` subprocesses for what an in-process worker
cannot show (crashes, shutdown, other settings)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from celery.contrib.testing.worker import start_worker
from celery.worker import state as worker_state
from django.conf import settings
from django.db import connection
from kombu.asynchronous import set_event_loop

from agentbus.active import STATUS_COMMAND
from agentbus.broker import uses_redis
from agentbus.queues import MAINTENANCE_QUEUE
from agentbus.transport import wake
from config.celery_app import app

ROOT = Path(__file__).resolve().parents[1]
# The worker's remote-control bootstep (its mailbox), by its name in the consumer's blueprint.
CONTROL_STEP = "celery.worker.consumer.control.Control"


# A worker subprocess started with this in its environment names its PostgreSQL sessions
# so (libpq reads PGAPPNAME): end_sessions finds them, and only them.
SESSIONS_NAME = "uws-test-worker"


def end_sessions(name: str = SESSIONS_NAME) -> int:
    """End the PostgreSQL sessions named `name` (as the server does to every client in a
    restart or a failover); returns how many it ended."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE application_name = %s AND datname = current_database()",
            [name],
        )
        return cursor.fetchone()[0]


def wait_for(predicate, timeout: float = 20.0, interval: float = 0.02):
    """Poll `predicate` until it returns something truthy or `timeout` passes; its last
    value (falsy when the time ran out)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def wait_until(predicate, timeout: float = 20.0, what: str = "condition", *, interval=0.05):
    """wait_for, failing saying `what` was not reached when `timeout` passes."""
    value = wait_for(predicate, timeout, interval)
    if not value:
        raise AssertionError(f"{what} not reached within {timeout}s")
    return value


def worker_status(name: str, timeout: float = 1.0) -> dict | None:
    """The `agentbus_status` reply of one worker (through its remote-control mailbox)."""

    # limit: the one reply ends the wait (without it, a broadcast waits out its timeout).
    for reply in app.control.broadcast(
        STATUS_COMMAND, destination=[name], reply=True, timeout=timeout, limit=1
    ):
        if name in reply:
            return reply[name]
    return None


def database_url() -> str:
    """The test database, for a subprocess that must see the rows this test commits."""
    s = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{s['NAME']}"
    return f"postgres://{s['USER']}:{s['PASSWORD']}@{s['HOST']}:{s['PORT'] or 5432}/{s['NAME']}"


@contextmanager
def shared_pool_worker(concurrency: int = 2) -> Iterator:
    """Start a worker (threads pool, `concurrency` threads) that follows the maintenance
    queue and the queues of active projects as the shared pool does (the AgentBus
    bootstep: broadcasts plus the periodic reconcile), through the workers' own broker
    transport. Yields the WorkController once its mailbox answers, so broadcasts sent
    after that reach it."""

    # A fresh event loop: Celery reuses kombu's process-wide hub, and a previous worker's
    # transport (Redis's poller) left its callbacks on it, which a worker on another
    # broker would run.
    set_event_loop(None)
    # The workers' transport is Redis's (on RabbitMQ the worker is kombu's pyamqp one).
    if uses_redis():
        app.conf.broker_transport = settings.AGENTBUS_WORKER_TRANSPORT or None
    try:
        with start_worker(
            app,
            pool="threads",
            concurrency=concurrency,
            queues=[MAINTENANCE_QUEUE],
            agentbus_mode="shared",
            perform_ping_check=False,
            loglevel="WARNING",
            shutdown_timeout=30,
        ) as worker:
            # Broadcasts reach the worker once its mailbox has subscribed (on Redis, at its
            # event loop's first turn). A ping sent before is lost, and the wait for its
            # reply (a BRPOP left in flight) takes the replies of the next pings until it
            # times out, a second later: the subscription first, then the ping.
            mailbox = worker.consumer.blueprint.steps[CONTROL_STEP].box.node.channel
            assert wait_for(lambda: getattr(mailbox, "_in_listen", True)), "no mailbox"
            deadline = time.monotonic() + 10
            while not app.control.ping(destination=[worker.hostname], timeout=0.2, limit=1):
                assert time.monotonic() < deadline, "the live worker does not answer"
            yield worker
            # Stopping: the event loop sees the flag at its next turn, and closing the
            # channel reads the reply of the poll in flight. Waking that poll ends both
            # now rather than after the BRPOP timeout (1 s, up to 2 s in all). On
            # RabbitMQ the loop waits in epoll until its next timer (up to 10 s): a
            # message to the worker's mailbox, on the connection it polls, wakes it.
            # (Best effort: a test may have left the worker without a consumer or broker.)
            worker_state.should_terminate = 0
            with contextlib.suppress(Exception):
                if uses_redis():
                    wake(worker.consumer.task_consumer.channel)
                else:
                    app.control.broadcast("ping", destination=[worker.hostname], reply=False)
        # Celery's test worker stops cold: it does not join the threads running tasks. A
        # task a test left running (a run it posted last) would go on writing into the
        # next test's database flush: it gets a few seconds to end first.
        wait_for(lambda: not worker_state.active_requests, timeout=5)
    finally:
        app.conf.broker_transport = None
        # The worker narrowed and extended the app's queue table; the next one starts clean.
        for cached in ("queues", "router", "default_queue"):
            app.amqp.__dict__.pop(cached, None)


class WorkerProcess:
    """A `celery -A config worker` subprocess in its own process group."""

    def __init__(self, argv: list[str], name: str, log_path: Path, env: dict[str, str]):
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float = 60.0) -> dict:
        status = wait_for(
            lambda: self.proc.poll() is None and worker_status(self.name, timeout=0.5),
            timeout=timeout,
            interval=0.2,
        )
        if not status:
            raise AssertionError(f"worker {self.name} did not start:\n{self.log()}")
        return status

    def wait_started(self, timeout: float = 60.0) -> None:
        """Until the worker logs that it is ready (for a broker other than the suite's,
        where this process's control replies may not reach: kombu remembers declaring
        the reply queue on the suite's broker)."""
        ready = wait_for(
            lambda: self.proc.poll() is None and f"{self.name} ready." in self.log(),
            timeout=timeout,
            interval=0.2,
        )
        if not ready:
            raise AssertionError(f"worker {self.name} did not start:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-6000:]

    def stacks(self) -> str:
        """Every thread's stack in the worker now: Celery's SIGUSR1 handler writes them
        to its log (for a test that failed with the worker running)."""
        if self.proc.poll() is not None:
            return f"(exited: {self.proc.returncode})"
        before = self.log_path.stat().st_size
        os.kill(self.proc.pid, signal.SIGUSR1)
        sizes = [before]

        def written() -> bool:  # grown, then still for one read
            sizes.append(self.log_path.stat().st_size)
            return sizes[-1] > before and sizes[-1] == sizes[-2]

        wait_for(written, timeout=5, interval=0.1)
        return self.log_path.read_bytes()[before:].decode(errors="replace")

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill_group(self) -> None:
        """SIGKILL the worker and its pool processes, as a crash would."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        # Tests that are about shutting down do it themselves; here speed matters (an
        # idle worker's soft shutdown would wait out its timeout).
        self.kill_group()
        self._log.close()


@contextmanager
def worker_processes(log_dir: Path, failed: Callable[[], bool] = lambda: False) -> Iterator:
    """Start real worker subprocesses: `start(*celery_args, name=..., env=...)`.

    They run with the test settings, this test run's database, Redis and broker, the
    test task module (-I tests.agentbus.tasks) and REMAP_SIGTERM=SIGQUIT (SIGTERM starts
    the soft shutdown), and are killed when the block ends: when `failed()` says so
    first, printing where each one's threads were (the failure's report shows it).
    """

    started: list[WorkerProcess] = []

    def start(
        *args: str,
        name: str | None = None,
        argv: list[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> WorkerProcess:
        if argv is None:
            name = name or f"w{len(started)}-{uuid.uuid4().hex[:6]}@test"
            argv = [sys.executable, "-m", "celery", "-A", "config", "worker", *args, "-n", name]
            argv.append("--loglevel=INFO")
        elif name is None:
            raise ValueError("name the worker that `argv` starts")
        argv = [*argv, "-I", "tests.agentbus.tasks", "--without-mingle", "--without-gossip"]
        log = log_dir / f"{name.split('@')[0]}.log"
        base_env = dict(
            os.environ,
            DJANGO_SETTINGS_MODULE="config.settings.test",
            REMAP_SIGTERM="SIGQUIT",
            # The settings as this test has them now (it may point them elsewhere).
            REDIS_URL=settings.REDIS_URL,
            CELERY_BROKER_URL=settings.CELERY_BROKER_URL,
            DATABASE_URL=database_url(),
            QDRANT_PATH=getattr(settings, "QDRANT_PATH", ""),
            PYTHONUNBUFFERED="1",
        )
        proc = WorkerProcess(argv, name, log, {**base_env, **(env or {})})
        started.append(proc)
        return proc

    try:
        yield start
    finally:
        if failed():
            for proc in started:
                print(f"--- worker {proc.name}: its threads when the test failed ---")
                print(proc.stacks()[-20000:])
        for proc in started:
            proc.stop()


@contextmanager
def broker_at(url: str) -> Iterator[None]:
    """Point this process's Celery app (publishing, control, in-process workers) at
    another broker for the block."""

    def reset() -> None:
        # Forget the pools (kombu keeps one per broker URL): the next use takes the one of
        # the URL now set. Closing them would leave closed pools behind in kombu's table.
        app._pool = None
        app.amqp._producer_pool = None
        # The remote-control mailbox keeps what it learnt of the broker it first met (an
        # in-process worker on the next broker would never hear a broadcast).
        app.__dict__.pop("control", None)

    old = app.conf.broker_url
    reset()
    app.conf.broker_url = url
    try:
        yield
    finally:
        reset()
        app.conf.broker_url = old
