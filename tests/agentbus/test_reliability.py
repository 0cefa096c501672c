"""Crashes and shutdowns of real prefork workers (`celery -A config worker` subprocesses):
a task interrupted by a killed process runs again and takes effect exactly once; SIGTERM
lets short tasks finish and gives long ones back; a message restored from `unacked`
after the whole worker died is skipped when its project was deleted meanwhile."""

from __future__ import annotations

import json
import os
import signal
import uuid

import pytest
from kombu import Connection

from agentbus import active
from agentbus.broker import uses_amqp
from agentbus.guard import project_tombstone
from agentbus.queues import MAINTENANCE_QUEUE, project_queue
from config.celery_app import app
from tests.agentbus import tasks
from tests.agentbus.conftest import send, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("bus_broker")]


def shared_worker(worker_process, concurrency: int):
    worker = worker_process("-P", "prefork", "-c", str(concurrency), "-Q", MAINTENANCE_QUEUE)
    status = worker.wait_ready()
    assert status["mode"] == "shared"
    # On Redis, worker processes poll through the cached-BRPOP channel.
    assert status["transport"] == (
        "kombu.transport.pyamqp.Transport" if uses_amqp() else "agentbus.transport.Transport"
    )
    return worker


def unacked(redis_client) -> int:
    """Messages handed to a worker and not acknowledged, where the bus keeps them: kombu's
    `unacked` hash on Redis. RabbitMQ keeps them itself and gives them back when the
    worker's connection closes (the tests check the queue depth there)."""
    return 0 if uses_amqp() else redis_client.hlen("unacked")


def test_a_task_whose_process_is_killed_runs_again_and_takes_effect_once(
    worker_process, redis_client
):
    project_id = uuid.uuid4()
    worker = shared_worker(worker_process, 1)
    task_id = send(
        tasks.record,
        user_id=1,
        project_id=project_id,
        kwargs={"tag": "k", "sleep_first_attempt": 60},
    )
    first = wait_for(lambda: tasks.started("k"), timeout=20)
    assert first, worker.log()

    os.kill(first[0]["pid"], signal.SIGKILL)  # the pool process dies mid-task

    assert wait_for(lambda: tasks.effects("k"), timeout=30) == [task_id], worker.log()
    runs = tasks.started("k")
    assert [r["attempt"] for r in runs] == [1, 2]
    assert runs[0]["pid"] != runs[1]["pid"]
    assert wait_for(lambda: unacked(redis_client) == 0)
    assert active.queue_depth(project_id) == 0


def test_sigterm_finishes_short_tasks_and_gives_long_ones_back(worker_process, redis_client):
    project_id = uuid.uuid4()
    worker = shared_worker(worker_process, 2)
    # Prefetch 1 per process: the worker holds no more messages than it can run.
    stats = app.control.inspect(destination=[worker.name], timeout=2, limit=1).stats()
    assert stats[worker.name]["prefetch_count"] == 2
    short = send(
        tasks.record, user_id=1, project_id=project_id, kwargs={"tag": "short", "sleep": 1.0}
    )
    long = send(
        tasks.record,
        user_id=1,
        project_id=project_id,
        kwargs={"tag": "long", "sleep_first_attempt": 60},
    )
    assert wait_for(lambda: tasks.started("short") and tasks.started("long"), timeout=20)

    worker.terminate()  # soft shutdown: CELERY_WORKER_SOFT_SHUTDOWN_TIMEOUT (5 s here)

    assert worker.wait(30) is not None, worker.log()
    assert tasks.effects("short") == [short]
    assert tasks.effects("long") == []
    # The long task's message is back in its queue, not lost and not half-acknowledged.
    assert active.queue_depth(project_id) == 1
    assert unacked(redis_client) == 0

    shared_worker(worker_process, 1)
    assert wait_for(lambda: tasks.effects("long"), timeout=30) == [long]
    assert [r["attempt"] for r in tasks.started("long")] == [1, 2]
    assert tasks.effects("short") == [short]


def test_a_message_restored_from_unacked_is_skipped_if_its_project_was_deleted(
    request, worker_process, redis_client
):
    project_id = uuid.uuid4()
    worker = shared_worker(worker_process, 1)
    send(
        tasks.record,
        user_id=1,
        project_id=project_id,
        kwargs={"tag": "crash", "sleep_first_attempt": 60},
    )
    assert wait_for(lambda: tasks.started("crash"), timeout=20), worker.log()

    if uses_amqp():
        project_tombstone(project_id)
        # RabbitMQ gives the message back as soon as the worker's connection closes.
        worker.kill_group()
        assert wait_for(lambda: active.queue_depth(project_id) == 1, timeout=10)
    else:
        worker.kill_group()  # the whole worker dies: its message stays in `unacked`
        [(_tag, raw)] = redis_client.hgetall("unacked").items()
        assert json.loads(raw)[2] == project_queue(project_id)
        project_tombstone(project_id)

        # What any worker's kombu does once the visibility timeout has passed.
        options = dict(app.conf.broker_transport_options, visibility_timeout=0)
        with Connection(app.conf.broker_url, transport_options=options) as conn:
            conn.default_channel.qos.restore_visible(num=100)
        assert active.queue_depth(project_id) == 1

    request.getfixturevalue("live_worker")

    assert wait_for(lambda: active.queue_depth(project_id) == 0 and not unacked(redis_client))
    assert len(tasks.started("crash")) == 1  # only the run that was killed
    assert tasks.effects("crash") == []
