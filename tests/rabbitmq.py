"""A RabbitMQ virtual host of the test run's own (tests and benches never use `/`), and a
RabbitMQ node of a test's own.

TEST_AMQP_URL names a broker URL to use as it is (CI: a vhost made for the job). Else a
RabbitMQ answering on 127.0.0.1:5672 gets a vhost `uws_test_<random>` made with
`rabbitmqctl` (it must run as a user allowed to: root here) and deleted, with every
queue in it, when the block ends. `amqp_unavailable()` says why neither is possible.

A test that raises an alarm (memory, disk: they hold the whole node) starts a node of
its own (`private_rabbitmq`): its own ports, data and log in a temporary folder, its own
Erlang cookie, stopped with the test; `private_rabbitmq_unavailable()` says why not.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from tests.local_http import free_port

HOST, PORT = "127.0.0.1", 5672


def _answers() -> bool:
    try:
        with socket.create_connection((HOST, PORT), timeout=1):
            return True
    except OSError:
        return False


def amqp_unavailable() -> str | None:
    """Why the tests cannot have a RabbitMQ vhost here, or None."""
    if os.environ.get("TEST_AMQP_URL"):
        return None
    if not _answers():
        return f"RabbitMQ does not answer on {HOST}:{PORT} (set TEST_AMQP_URL to use another)"
    if shutil.which("rabbitmqctl") is None:
        return "rabbitmqctl is not on PATH: cannot make a vhost of the test run's own"
    return None


def _ctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


@contextlib.contextmanager
def amqp_vhost(prefix: str = "uws_test") -> Iterator[str]:
    """Yield the broker URL of a vhost of our own (deleted afterwards)."""
    given = os.environ.get("TEST_AMQP_URL")
    if given:
        yield given
        return
    vhost = f"{prefix}_{uuid.uuid4().hex[:10]}"
    _ctl("add_vhost", vhost)
    try:
        _ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        yield f"amqp://guest:guest@{HOST}:{PORT}/{vhost}"
    finally:
        with contextlib.suppress(Exception):
            _ctl("delete_vhost", vhost)


# The server's own scripts: Debian's /usr/sbin wrappers switch to the `rabbitmq` user,
# whose home holds the shared node's cookie, not a private node's.
_SBIN = Path("/usr/lib/rabbitmq/bin")


def private_rabbitmq_unavailable() -> str | None:
    """Why this machine cannot start a RabbitMQ node of a test's own, or None."""
    if not (_SBIN / "rabbitmq-server").exists():
        return f"no RabbitMQ server installed ({_SBIN}/rabbitmq-server)"
    return None


class PrivateRabbitMQ:
    """A RabbitMQ node on free ports, its state in `folder`."""

    def __init__(self, folder: str) -> None:
        self.port = free_port()
        dist_port = free_port()
        self.node = f"uws_test_{self.port}@localhost"
        Path(folder, "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.port}\nloopback_users = none\n"
        )
        self._env = {
            **os.environ,
            "HOME": folder,  # the Erlang cookie, made by the node, read by rabbitmqctl
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_CONFIG_FILE": f"{folder}/rabbitmq",
            "RABBITMQ_CONF_ENV_FILE": "/dev/null",  # not the shared node's settings
            "RABBITMQ_MNESIA_BASE": f"{folder}/mnesia",
            "RABBITMQ_LOG_BASE": f"{folder}/log",
            "RABBITMQ_PID_FILE": f"{folder}/pid",
            "RABBITMQ_DIST_PORT": str(dist_port),
            "RABBITMQ_ENABLED_PLUGINS_FILE": f"{folder}/enabled_plugins",
            "RABBITMQ_ENABLED_PLUGINS": "",
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "ERL_CRASH_DUMP": f"{folder}/erl_crash.dump",
        }
        self._folder = folder
        self._process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def start(self, timeout: float = 60) -> PrivateRabbitMQ:
        self._process = subprocess.Popen(
            [str(_SBIN / "rabbitmq-server")],
            env=self._env,
            cwd=self._folder,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # its Erlang processes in a group of their own
        )
        deadline = time.monotonic() + timeout
        while True:  # the AMQP listener opens last, once the node has booted
            try:
                with socket.create_connection((HOST, self.port), timeout=1):
                    return self
            except OSError:
                if self._process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"RabbitMQ node {self.node} did not start") from None
                time.sleep(0.1)

    def ctl(self, *args: str) -> None:
        subprocess.run(
            [str(_SBIN / "rabbitmqctl"), "-q", "-n", self.node, *args],
            env=self._env, cwd=self._folder, check=True, capture_output=True, timeout=60,
        )  # fmt: skip

    def memory_alarm(self, raised: bool) -> None:
        """Raise the node's memory alarm (its watermark below what it uses), or clear it
        (the default watermark, 40 % of the machine's memory)."""
        self.ctl("set_vm_memory_high_watermark", "0.00001" if raised else "0.4")

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait(timeout=30)


@contextlib.contextmanager
def private_rabbitmq() -> Iterator[PrivateRabbitMQ]:
    with tempfile.TemporaryDirectory(prefix="uws-rabbitmq-") as folder:
        node = PrivateRabbitMQ(folder).start()
        try:
            yield node
        finally:
            node.stop()
