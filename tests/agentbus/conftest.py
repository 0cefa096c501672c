"""Helpers for the AgentBus tests: waiting on real processes, and Celery workers
started as subprocesses (`celery -A config worker`, prefork) for crash and shutdown
tests that an in-process worker cannot show."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from django.conf import settings

from agentbus import publish
from agentbus.active import STATUS_COMMAND
from common.redis import broker_redis

ROOT = Path(__file__).resolve().parents[2]


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.02):
    """Poll `predicate` until it returns something truthy or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def worker_status(name: str, timeout: float = 1.0) -> dict | None:
    """The `agentbus_status` reply of one worker (through its remote-control mailbox)."""
    from config.celery_app import app

    for reply in app.control.broadcast(
        STATUS_COMMAND, destination=[name], reply=True, timeout=timeout
    ):
        if name in reply:
            return reply[name]
    return None


def live_worker_name(worker) -> str:
    return worker.hostname


@pytest.fixture(autouse=True)
def _clean_broker_state(_clean_workspace_keys):
    """Each test starts with no project queue and nothing in kombu's `unacked` (the suite
    already wipes the `uws:` keys, the active set and tombstones among them)."""
    client = broker_redis()
    keys = [*client.scan_iter(match="uws.project.*", count=1000), "unacked", "unacked_index"]
    client.unlink(*keys)
    yield


def send(task, *, user_id: int = 1, project_id, kwargs: dict | None = None, **options) -> str:
    """Publish a test task on the project's queue; returns the task id."""
    payload = {"user_id": user_id, **(kwargs or {})}
    return publish(task, project_id=project_id, kwargs=payload, **options).id


@pytest.fixture
def project_id() -> uuid.UUID:
    return uuid.uuid4()


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

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-6000:]

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


@pytest.fixture
def worker_process(tmp_path):
    """Start real worker subprocesses: `worker_process(*celery_args, name=...)`.

    They run with the test settings, the test task module (-I tests.agentbus.tasks) and
    REMAP_SIGTERM=SIGQUIT (SIGTERM starts the soft shutdown), and are stopped at the
    end of the test.
    """
    started: list[WorkerProcess] = []
    base_env = dict(
        os.environ,
        DJANGO_SETTINGS_MODULE="config.settings.test",
        REMAP_SIGTERM="SIGQUIT",
        REDIS_URL=settings.REDIS_URL,
        CELERY_BROKER_URL=settings.CELERY_BROKER_URL,
        PYTHONUNBUFFERED="1",
    )

    def start(
        *args: str,
        name: str | None = None,
        argv: list[str] | None = None,
        env: dict[str, str] | None = None,
    ):
        if argv is None:
            name = name or f"w{len(started)}-{uuid.uuid4().hex[:6]}@test"
            argv = [sys.executable, "-m", "celery", "-A", "config", "worker", *args, "-n", name]
            argv.append("--loglevel=INFO")
        elif name is None:
            raise ValueError("name the worker that `argv` starts")
        argv = [*argv, "-I", "tests.agentbus.tasks", "--without-mingle", "--without-gossip"]
        log = tmp_path / f"{name.split('@')[0]}.log"
        proc = WorkerProcess(argv, name, log, {**base_env, **(env or {})})
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()
