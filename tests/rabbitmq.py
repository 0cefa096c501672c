"""A RabbitMQ virtual host of the test run's own (tests and benches never use `/`).

TEST_AMQP_URL names a broker URL to use as it is (CI: a vhost made for the job). Else a
RabbitMQ answering on 127.0.0.1:5672 gets a vhost `uws_test_<random>` made with
`rabbitmqctl` (it must run as a user allowed to: root here) and deleted, with every
queue in it, when the block ends. `amqp_unavailable()` says why neither is possible.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator

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
