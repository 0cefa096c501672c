"""A full volume under the embedded vector store: an ingest ends in error naming the
volume instead of the worker dying mid-write (and its redelivery filling it again), and
health says which volume is full. Uses a small tmpfs the test mounts (needs root)."""

from __future__ import annotations

import contextlib
import subprocess
import uuid

import pytest
from rest_framework.test import APIClient

from agentbus import MAINTENANCE_QUEUE
from common.disk import disk_free_mb
from tests.factories import AgentFactory, ProjectFactory, UserFactory
from tests.workers import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

MIN_FREE_MB = 8


@pytest.fixture
def small_volume(tmp_path):
    mount = tmp_path / "volume"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def ingest(api, agent, text: str) -> dict:
    url = f"/my/projects/{agent.project_id}/agents/{agent.id}/context/"
    response = api.post(url, {"documents": [text]}, format="json")
    assert response.status_code == 202, response.content
    job_url = f"{url}jobs/{response.json()['job_id']}/"

    def ended():
        job = api.get(job_url).json()
        return job if job["status"] in ("done", "error") else None

    return wait_until(ended, timeout=60, what="the ingest job ended")


def test_an_ingest_on_a_full_volume_ends_in_error_and_health_names_it(
    api, user, worker_process, small_volume, settings
):
    store = small_volume / "qdrant"
    settings.QDRANT_PATH, settings.QDRANT_URL = str(store), ""
    settings.DISK_MIN_FREE_MB = MIN_FREE_MB
    env = {"QDRANT_PATH": str(store), "DISK_MIN_FREE_MB": str(MIN_FREE_MB)}
    worker = worker_process("-Q", MAINTENANCE_QUEUE, "-P", "threads", "-c", "2", env=env)
    try:
        worker.wait_started()
        agent = AgentFactory(project=ProjectFactory(owner=user))
        assert ingest(api, agent, "Room to spare.")["status"] == "done"

        filler = small_volume / "filler"
        with filler.open("wb") as f:  # leave 1 MB
            f.write(b"\0" * int((disk_free_mb(small_volume) - 1) * 1024 * 1024))
        for attempt in range(2):  # a second one is refused the same way: nothing replays
            job = ingest(api, agent, f"No room for this, try {attempt}.")
            assert job["status"] == "error", job
            assert f"the volume holding {store} is full" in job["error"], job
        assert worker.proc.poll() is None, worker.log()  # the worker lives on

        staff = APIClient()
        staff.force_authenticate(UserFactory(is_staff=True))
        health = staff.get("/admin/workspaces/health").json()
        disk = health["checks"]["disk"]
        assert disk["healthy"] is False and "QDRANT_PATH" in disk["error"], disk
        assert disk["volumes"]["QDRANT_PATH"]["path"] == str(store)
        assert "disk" in health["degraded"]

        filler.unlink()  # space freed: ingest works again
        assert ingest(api, agent, f"Room again {uuid.uuid4()}.")["status"] == "done"
    finally:
        with contextlib.suppress(Exception):
            worker.kill_group()
