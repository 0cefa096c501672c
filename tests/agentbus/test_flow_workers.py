"""Flow control with real worker processes (`celery -A config worker` subprocesses, the
threads pool as the Procfile runs it): a cap holds across two workers, and a slot held
by a worker that was killed comes back within its lease."""

from __future__ import annotations

import time
import uuid

import pytest

from agentbus.flow import flow_rules_set
from agentbus.queues import MAINTENANCE_QUEUE
from tests.agentbus import tasks
from tests.agentbus.conftest import send, wait_for

pytestmark = pytest.mark.slow


def _shared(worker_process, *, env=None):
    worker = worker_process("-P", "threads", "-c", "4", "-Q", MAINTENANCE_QUEUE, env=env or {})
    status = worker.wait_ready()
    assert status["mode"] == "shared" and status["ready_list"], worker.log()
    return worker


def test_a_cap_holds_across_two_worker_processes(worker_process):
    project_id = uuid.uuid4()
    flow_rules_set(project_id=project_id, weight=1, max_in_flight=2)
    first, second = _shared(worker_process), _shared(worker_process)
    for _ in range(12):
        send(tasks.occupy, project_id=project_id, kwargs={"tag": "c", "sleep": 0.3})
    assert wait_for(lambda: len(tasks.effects("c")) == 12, timeout=60), first.log()
    assert tasks.running_peak(str(project_id)) == 2  # reached, never passed
    pids = {run["pid"] for run in tasks.started("c")}
    assert len(pids) == 2, (first.log(), second.log())  # both workers served it


def test_a_killed_workers_slot_comes_back_within_its_lease(worker_process):
    lease = {"AGENTBUS_SLOT_LEASE_SECONDS": "3"}
    project_id = uuid.uuid4()
    flow_rules_set(project_id=project_id, weight=1, max_in_flight=1)
    doomed = _shared(worker_process, env=lease)
    send(tasks.occupy, project_id=project_id, kwargs={"tag": "stuck", "sleep": 600})
    assert wait_for(lambda: tasks.started("stuck"), timeout=30), doomed.log()
    survivor = _shared(worker_process, env=lease)
    send(tasks.occupy, project_id=project_id, kwargs={"tag": "next"})
    # Renewed by its live worker, the slot outlives its lease (over two of them here):
    # the next task waits in the queue.
    assert not wait_for(lambda: tasks.started("next"), timeout=7), survivor.log()

    doomed.kill_group()  # its slot is held by nobody now
    killed = time.monotonic()
    assert wait_for(lambda: tasks.effects("next"), timeout=30), survivor.log()
    # The lease (3 s) plus a poll, not the broker's visibility timeout (an hour).
    assert time.monotonic() - killed < 3 + 3
    assert tasks.effects("stuck") == []
