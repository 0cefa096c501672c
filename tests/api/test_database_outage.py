"""A database blip is a 503 with Retry-After, never a 500, and writes nothing.

The web process runs as the Procfile runs it (uvicorn, a process of its own) against a
PostgreSQL server this test starts itself in a temporary folder, on a port of its own,
so that it can kill it (`-m immediate`, as a crash) and restart it (`-m fast`) without
touching the machine's shared server.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from common.asgi import Admission
from tests.local_http import free_port
from tests.private_postgres import PrivatePostgres
from tests.workers import wait_until

ROOT = Path(__file__).resolve().parents[2]
POOL_TIMEOUT = 1.0
ZERO = "00000000-0000-0000-0000-000000000000"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def postgres(tmp_path_factory):
    """The private server, migrated, with the demo user (its API token: `token`); `env`
    is the web process's environment on it."""
    reason = PrivatePostgres.unavailable()
    if reason:
        pytest.skip(reason)
    server = PrivatePostgres()
    server.env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings.test",
        "DATABASE_URL": server.url,
        "DB_POOL_MAX_SIZE": "4",
        "DB_WEB_POOL_MAX_SIZE": "4",
        "DB_POOL_TIMEOUT_SECONDS": str(POOL_TIMEOUT),
        "VAR_DIR": str(tmp_path_factory.mktemp("var")),
        "LOG_LEVEL": "WARNING",
    }
    try:
        server.token = server.init_migrated(server.env)
    except (subprocess.CalledProcessError, OSError) as exc:
        server.destroy()
        pytest.skip(f"could not start a private PostgreSQL server: {exc}")
    yield server
    server.destroy()


@pytest.fixture(scope="module")
def web(postgres, tmp_path_factory):
    """uvicorn serving the app on the private database."""
    env, token = postgres.env, postgres.token
    python = sys.executable
    port = free_port()
    log = open(tmp_path_factory.mktemp("log") / "uvicorn.log", "w")  # noqa: SIM115
    server = subprocess.Popen(
        [python, "-m", "uvicorn", "config.asgi:application", "--port", str(port),
         "--lifespan", "on", "--log-level", "warning"],
        env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    client = httpx.Client(
        base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Token {token}"}
    )

    def answers():
        try:
            return client.get("/my/projects/").status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(answers, timeout=30, interval=0.1, what="uvicorn answering")
        yield client
    finally:
        client.close()
        server.terminate()
        server.wait(15)
        log.close()


def _project_names(client) -> set[str]:
    return {
        p["name"] for p in client.get("/my/projects/", params={"limit": 200}).json()["projects"]
    }


def _timed(call):
    started = time.monotonic()
    response = call()
    return response, time.monotonic() - started


def test_a_killed_database_is_a_quick_503_and_nothing_is_written(postgres, web):
    assert web.post("/my/projects/", json={"name": "before"}).status_code == 201
    postgres.kill()
    try:
        for call in (
            lambda: web.get("/my/projects/"),
            lambda: web.post("/my/projects/", json={"name": "during"}),
            lambda: web.get("/my/projects/00000000-0000-0000-0000-000000000000/"),
            # Plain async views, outside DRF: an event stream and a context search.
            lambda: web.get(f"/my/projects/{ZERO}/chat/{ZERO}/events/"),
            lambda: web.get(f"/my/projects/{ZERO}/agents/{ZERO}/context/", params={"q": "x"}),
        ):
            response, took = _timed(call)
            assert response.status_code == 503, response.text
            assert response.headers["Retry-After"].isdigit()
            assert response.json()["code"] == "backend_unavailable"
            # Bounded by the pool's wait, not by a client's patience.
            assert took < POOL_TIMEOUT + 2, took
    finally:
        postgres.start()
    seen: list[int] = []

    def served():
        seen.append(web.get("/my/projects/").status_code)
        return seen[-1] == 200

    wait_until(served, timeout=30, interval=0.2, what="answers once the database is back")
    assert set(seen) <= {200, 503}, seen  # never a 500 on the way back
    names = _project_names(web)
    assert "before" in names and "during" not in names


def test_a_fast_restart_never_hands_out_a_dead_connection(postgres, web):
    # Fill the pool with connections that the restart will kill while they are idle.
    for _ in range(8):
        assert web.get("/my/projects/").status_code == 200
    postgres.restart_fast()
    # Each pooled connection is checked before it is handed out, so no dead one reaches
    # a request. psycopg_pool waits about a second after each failed check, so a
    # request that meets several dead ones may run out of DB_POOL_TIMEOUT_SECONDS: a
    # 503 with Retry-After, never a 500; then the pool holds live connections only.
    responses = [web.get("/my/projects/") for _ in range(12)]
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503}, codes
    assert all(r.headers.get("Retry-After") for r in responses if r.status_code == 503)
    assert codes[-4:] == [200] * 4, codes
    response = web.post("/my/projects/", json={"name": "after restart"})
    assert response.status_code == 201, response.text


async def _admit_all(gate: Admission, count: int, hold: float) -> list[bool]:
    async def one() -> bool:
        if not await gate.acquire():
            return False
        await asyncio.sleep(hold)
        gate.release()
        return True

    return list(await asyncio.gather(*(one() for _ in range(count))))


def test_admission_queues_a_burst_and_refuses_past_its_bounds():
    # Two at once, room for four more waiting up to a second: 6 of 10 get in.
    admitted = asyncio.run(_admit_all(Admission(limit=2, queue=4, wait=1.0), 10, 0.05))
    assert admitted.count(True) == 6
    # A wait shorter than the queue's turn refuses the tail instead of holding it (times
    # long enough that a loaded machine's scheduling delays do not reorder them).
    admitted = asyncio.run(_admit_all(Admission(limit=1, queue=10, wait=0.6), 6, 0.2))
    assert 2 <= admitted.count(True) <= 4 and admitted[0]
    # Once it knows how long a request holds its slot, a request whose turn would come
    # too late is refused at once, not after its wait.
    gate = Admission(limit=1, queue=100, wait=0.5)
    asyncio.run(_admit_all(gate, 1, 0.2))  # it learns: 0.2 s a request
    started = time.monotonic()
    admitted = asyncio.run(_admit_all(gate, 10, 0.2))
    assert admitted[:3] == [True] * 3 and admitted.count(True) <= 4
    assert time.monotonic() - started < 1.2
