"""A database host that stops answering without a reset (its cable pulled: packets
dropped, nothing refused): a request answers 503 within DB_TCP_TIMEOUT_SECONDS (2 s
here) and the pool's wait, instead of waiting for the kernel to give up on the
connection (about 15 min), and the web answers again once the cable is back.

PostgreSQL runs on a host of its own (a network namespace, tests.multihost.netbed); the
web process is the Procfile's uvicorn on the test's host. Run alone: `pytest -m
multihost`; skipped, saying why, where namespaces cannot be made.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.local_http import free_port
from tests.multihost.netbed import NetBed, unavailable
from tests.multihost.stack import HostPostgres
from tests.private_postgres import PrivatePostgres
from tests.workers import ROOT, wait_until

pytestmark = [pytest.mark.multihost, pytest.mark.slow]

TCP_TIMEOUT = 2.0
POOL_TIMEOUT = 1.0


@pytest.fixture
def database_host(tmp_path):
    reason = unavailable() or PrivatePostgres.unavailable()
    if reason:
        pytest.skip(reason)
    with NetBed(["db"]) as bed:
        server = HostPostgres(bed, "db")
        env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "config.settings.test",
            "DATABASE_URL": server.url,
            "DB_POOL_MAX_SIZE": "4",
            "DB_WEB_POOL_MAX_SIZE": "4",
            "DB_POOL_TIMEOUT_SECONDS": str(POOL_TIMEOUT),
            "DB_TCP_TIMEOUT_SECONDS": str(TCP_TIMEOUT),
            "VAR_DIR": str(tmp_path / "var"),
            "LOG_LEVEL": "WARNING",
        }
        try:
            server.token = server.init_migrated(env)
            yield bed, server, env
        finally:
            server.destroy()


def test_a_database_host_that_stops_answering_is_a_bounded_503(database_host, tmp_path):
    bed, server, env = database_host
    port = free_port()
    with open(tmp_path / "uvicorn.log", "w") as log:
        web = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "config.asgi:application", "--port", str(port),
             "--lifespan", "on", "--log-level", "warning"],
            env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    client = httpx.Client(
        base_url=f"http://127.0.0.1:{port}",
        headers={"Authorization": f"Token {server.token}"},
        timeout=120,
    )
    try:

        def answers():
            try:
                return client.get("/my/projects/").status_code == 200
            except httpx.TransportError:
                return False

        wait_until(answers, timeout=60, what="uvicorn answering")
        # Every pooled connection in use once (four requests at a time).
        with ThreadPoolExecutor(4) as pool:
            assert set(pool.map(lambda _: client.get("/my/projects/").status_code, range(8))) == {
                200
            }

        bed.link("db", up=False)
        cut = time.monotonic()

        def timed(_):
            started = time.monotonic()
            response = client.get("/my/projects/")
            return response.status_code, time.monotonic() - started

        with ThreadPoolExecutor(4) as pool:
            outcomes = list(pool.map(timed, range(4)))
        while_cut = time.monotonic() - cut
        bed.link("db", up=True)

        print(f"\nwhile the database host was cut off: {outcomes}")
        # The pool's check of a connection (its data unacknowledged for 2 s), then its
        # wait for another (1 s); a new connection gets connect_timeout (5 s).
        assert all(status == 503 for status, _ in outcomes), outcomes
        assert max(took for _, took in outcomes) < TCP_TIMEOUT + POOL_TIMEOUT + 5, outcomes
        assert while_cut < 15

        wait_until(answers, timeout=30, what="answers once the cable is back")
    finally:
        client.close()
        web.terminate()
        web.wait(15)
