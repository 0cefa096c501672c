"""Maintenance never waits behind agent runs: with every thread of the shared worker
holding a slow answer, the recovery pass (sent as beat sends it) runs at once on the
Procfile's maintenance worker and dispatches a lost run again."""

from __future__ import annotations

import re
import shlex
import sys
import time
import uuid
from datetime import timedelta

import pytest
from django.conf import settings
from django.utils import timezone

from agentbus import MAINTENANCE_QUEUE, URGENT_MAINTENANCE_QUEUE
from chat.models import Message, Run
from config.celery_app import app
from tests.factories import AgentFactory, ChatSessionFactory, ProjectFactory
from tests.workers import ROOT, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]


def procfile_argv(process: str, *, name: str) -> list[str]:
    """The Procfile's command line of `process`, as this test's Python runs it (env
    assignments dropped, ${VAR:-default} given its default, our own worker name)."""
    lines = (ROOT / "Procfile").read_text().splitlines()
    line = next((ln for ln in lines if ln.startswith(f"{process}:")), None)
    assert line is not None, f"the Procfile has no {process!r} process"
    command = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", line.split(":", 1)[1])
    words = [w for w in shlex.split(command) if not re.match(r"^[A-Z_]+=", w)]
    assert words[0] == "celery"
    argv = [sys.executable, "-m", *words]
    if "-n" in argv:
        del argv[argv.index("-n") : argv.index("-n") + 2]
    return [*argv, "-n", name]


def post(api, session, content="Tell me something long") -> int:
    url = f"/my/projects/{session.project_id}/chat/{session.id}/messages/"
    response = api.post(url, {"content": content}, format="json")
    assert response.status_code == 202, response.content
    return response.json()["assistant_message_id"]


def test_the_recovery_pass_runs_while_every_run_slot_is_busy(
    api, user, worker_process, fake_openai, tmp_path
):
    fake_openai.mode, fake_openai.delay = "slow", 0.5
    fake_openai.tokens = [f"w{i} " for i in range(60)]  # 30 s answers
    project = ProjectFactory(owner=user)
    agent = AgentFactory(project=project, model="gpt-local")
    env = {
        "OPENAI_BASE_URL": fake_openai.base_url,
        "OPENAI_API_KEY": "test-key",
        "QDRANT_PATH": str(tmp_path / "qdrant"),
    }
    shared = worker_process("-Q", MAINTENANCE_QUEUE, "-P", "threads", "-c", "3", env=env)
    name = f"maintenance-{uuid.uuid4().hex[:6]}@test"
    maintenance = worker_process(argv=procfile_argv("maintenance", name=name), name=name, env=env)
    shared.wait_started()
    maintenance.wait_started()

    # A run whose worker died: claimed, its lease long gone.
    lost_session = ChatSessionFactory(agent=agent, project=project)
    lost_id = post(api, lost_session, "lost")
    wait_until(
        lambda: Run.objects.filter(message_id=lost_id, status="running").exists(),
        what="the lost run started",
    )
    # Three slow answers: with the lost one, the shared worker's three threads are busy
    # (the third answer waits on the queue).
    busy = [post(api, ChatSessionFactory(agent=agent, project=project)) for _ in range(3)]
    wait_until(
        lambda: Message.objects.filter(id__in=busy, status="streaming").count() == 2,
        what="the pool saturated",
    )
    lost = Run.objects.get(message_id=lost_id)
    Run.objects.filter(id=lost.id).update(
        status="running", lease_expires_at=timezone.now() - timedelta(seconds=1)
    )
    # (Its thread goes on streaming until its lease renewal sees the run taken back.)

    beat = settings.CELERY_BEAT_SCHEDULE["agents.recover_runs"]
    assert beat["options"]["queue"] == URGENT_MAINTENANCE_QUEUE
    sent = time.monotonic()
    app.send_task(beat["task"], **beat["options"])  # as beat sends it (expires 10 s)
    wait_until(
        lambda: Run.objects.get(id=lost.id).attempt > lost.attempt,
        timeout=30,
        what="the lost run dispatched again",
    )
    took = time.monotonic() - sent
    print(f"saturated-pool recovery: {took:.2f}s (3 of 3 threads busy, 1 answer queued)")
    assert took < beat["options"]["expires"], took
    assert Message.objects.filter(id__in=busy, status="streaming").count() == 2  # still busy
