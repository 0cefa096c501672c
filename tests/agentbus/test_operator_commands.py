"""Operators' commands as the README prints them: `celery -A config inspect
agentbus_status` is a known command and answers per worker; Flower (as the Procfile
starts it, with bin/flowerconfig.py) lists a newly active project's queue without anyone
asking it to refresh."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest
from django.conf import settings

from agentbus.queues import MAINTENANCE_QUEUE, project_queue
from tests.agentbus import tasks
from tests.agentbus.conftest import ROOT, send, wait_for
from tests.agentbus.test_flower import _page
from tests.local_http import free_port

pytestmark = pytest.mark.slow


def _env() -> dict[str, str]:
    return dict(
        os.environ,
        DJANGO_SETTINGS_MODULE="config.settings.test",
        REDIS_URL=settings.REDIS_URL,
        CELERY_BROKER_URL=settings.CELERY_BROKER_URL,
    )


def test_inspect_agentbus_status_is_a_known_command_that_answers(live_worker):
    project = uuid.uuid4()
    send(tasks.record, user_id=1, project_id=project, kwargs={"tag": "i"})
    assert wait_for(lambda: tasks.effects("i"))
    done = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "config", "inspect", "agentbus_status",
         "--json", "--timeout", "3", "-d", live_worker.hostname],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr + done.stdout
    assert "not recognized" not in done.stderr
    replies = json.loads(done.stdout)
    status = replies[live_worker.hostname]
    assert status["mode"] == "shared"
    assert project_queue(project) in status["queues"], status


def test_flower_lists_a_new_project_queue_without_a_manual_refresh(live_worker, tmp_path):
    port = free_port()
    log = open(tmp_path / "flower.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "config", "flower", "--conf=bin/flowerconfig.py",
         "--address=127.0.0.1", f"--port={port}", "--inspect_timeout=2000"],
        cwd=ROOT, env={**_env(), "FLOWER_INSPECT_SECONDS": "1"}, stdout=log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        assert wait_for(lambda: MAINTENANCE_QUEUE in _page(f"{base}/broker"), timeout=60), (
            tmp_path / "flower.log"
        ).read_text()[-3000:]
        later = uuid.uuid4()
        assert project_queue(later) not in _page(f"{base}/broker")
        send(tasks.record, user_id=1, project_id=later, kwargs={"tag": "later"})
        assert wait_for(lambda: tasks.effects("later"))
        # Only the broker page is read: Flower looks at the workers again by itself.
        assert wait_for(lambda: project_queue(later) in _page(f"{base}/broker"), timeout=60)
    finally:
        proc.kill()
        proc.wait(10)
        log.close()
