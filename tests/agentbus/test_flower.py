"""Flower's Broker tab lists the per-project queues of active workspaces.

Flower (2.2) lists the queues the workers report through `inspect active_queues`, as of
its last look at the workers: on start, and whenever the Workers page is refreshed
(`/workers?refresh=1`). A shared worker reports the active project queues it follows.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import httpx
import pytest
from django.conf import settings

from agentbus.queues import MAINTENANCE_QUEUE, project_queue
from tests.agentbus import tasks
from tests.agentbus.conftest import ROOT, send, wait_for
from tests.local_http import free_port

pytestmark = pytest.mark.slow


@pytest.fixture
def flower(tmp_path):
    port = free_port()
    env = dict(
        os.environ,
        DJANGO_SETTINGS_MODULE="config.settings.test",
        REDIS_URL=settings.REDIS_URL,
        CELERY_BROKER_URL=settings.CELERY_BROKER_URL,
    )
    log = open(tmp_path / "flower.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "config", "flower", "--address=127.0.0.1",
         f"--port={port}", "--inspect_timeout=2000"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        yield f"http://127.0.0.1:{port}", tmp_path / "flower.log"
    finally:
        proc.kill()
        proc.wait(10)
        log.close()


def _page(url: str) -> str:
    try:
        return httpx.get(url, timeout=5).text
    except httpx.HTTPError:
        return ""


def test_flower_lists_the_active_project_queues(live_worker, flower):
    base, log = flower
    first, second = uuid.uuid4(), uuid.uuid4()
    send(tasks.record, user_id=1, project_id=first, kwargs={"tag": "f"})
    assert wait_for(lambda: tasks.effects("f"))

    broker = wait_for(lambda: project_queue(first) in _page(f"{base}/broker"), timeout=60)
    assert broker, log.read_text()[-3000:]
    page = _page(f"{base}/broker")
    assert MAINTENANCE_QUEUE in page and project_queue(second) not in page

    # A project that becomes active later shows up once Flower looks at the workers again
    # (after the worker has followed its queue, which comes just after its first task).
    send(tasks.record, user_id=1, project_id=second, kwargs={"tag": "s"})
    assert wait_for(lambda: tasks.effects("s"))

    def listed_after_refresh() -> bool:
        _page(f"{base}/workers?refresh=1")
        return project_queue(second) in _page(f"{base}/broker")

    assert wait_for(listed_after_refresh, timeout=30)
