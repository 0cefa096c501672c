"""A real shared worker (the `live_worker` fixture: in this process, threads pool)
following the active project queues: broadcasts, reconcile, retirement, the reaper,
tombstones and fairness."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
from celery.worker import state as worker_state

from agentbus import active
from agentbus.active import ACTIVE_KEY, FOLLOW_COMMAND, UNFOLLOW_COMMAND
from agentbus.guard import project_tombstone
from agentbus.queues import MAINTENANCE_QUEUE, project_queue
from agentbus.tasks import reap_idle_queues
from agentbus.transport import unacked_queues
from common.redis import broker_redis
from config.celery_app import app
from tests.agentbus import tasks
from tests.agentbus.conftest import send, wait_for, worker_status

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("bus_broker")]

WORKER_TRANSPORT = {
    "redis": "agentbus.transport.Transport",
    "amqp": "kombu.transport.pyamqp.Transport",
}


@pytest.fixture
def no_periodic_reconcile(settings):
    """Only broadcasts move the worker (request it before live_worker)."""
    settings.AGENTBUS_RECONCILE_SECONDS = 3600


def followed(worker) -> set[str]:
    return set(worker_status(worker.hostname)["queues"])


def broadcast(command: str, queue: str) -> None:
    app.control.broadcast(command, arguments={"queues": [queue]}, reply=False)


def test_a_new_project_is_followed_on_broadcast(no_periodic_reconcile, live_worker, bus_broker):
    project_id = uuid.uuid4()
    queue = project_queue(project_id)
    status = worker_status(live_worker.hostname)
    assert status["mode"] == "shared" and status["queues"] == []
    assert status["transport"] == WORKER_TRANSPORT[bus_broker]

    task_id = send(tasks.record, user_id=1, project_id=project_id, kwargs={"tag": "n"})

    assert wait_for(lambda: tasks.effects("n")) == [task_id]
    # The task came through the ready list; the follow (for operators) comes just after.
    assert wait_for(lambda: followed(live_worker) == {queue}, timeout=5)
    # What Flower's Broker tab lists: the queues workers report through active_queues.
    reply = app.control.inspect(
        destination=[live_worker.hostname], timeout=1, limit=1
    ).active_queues()
    reported = {q["name"]: q for q in reply[live_worker.hostname]}
    assert set(reported) == {MAINTENANCE_QUEUE, queue}
    assert reported[queue]["exchange"]["name"] == "" and reported[queue]["routing_key"] == queue


def test_a_missed_broadcast_is_repaired_by_reconcile(live_worker, redis_client):
    queue = project_queue(uuid.uuid4())
    redis_client.zadd(ACTIVE_KEY, {queue: time.time()})  # active, never announced
    assert wait_for(lambda: followed(live_worker) == {queue}, timeout=5)
    redis_client.zrem(ACTIVE_KEY, queue)  # retired, never announced
    assert wait_for(lambda: followed(live_worker) == set(), timeout=5)


def test_broadcasts_out_of_order_end_in_the_active_state(
    no_periodic_reconcile, live_worker, redis_client
):
    project_id = uuid.uuid4()
    queue = project_queue(project_id)
    active.mark_active(project_id)
    assert wait_for(lambda: followed(live_worker) == {queue}, timeout=5)

    # A retirement's broadcast arriving after the producer re-activated the queue.
    broadcast(UNFOLLOW_COMMAND, queue)
    # `followed` asks the worker's mailbox, behind the broadcast: its answer comes after
    # the broadcast was handled.
    assert followed(live_worker) == {queue}

    # An activation's broadcast arriving after the reaper retired the queue.
    redis_client.zrem(ACTIVE_KEY, queue)
    broadcast(UNFOLLOW_COMMAND, queue)
    assert wait_for(lambda: followed(live_worker) == set(), timeout=5)
    broadcast(FOLLOW_COMMAND, queue)
    assert followed(live_worker) == set()


def test_retire_project_stops_consumers_and_purges(live_worker):
    project_id = uuid.uuid4()
    # 10 s of work for the worker's two threads: the queue cannot drain while this test
    # is kept off the cores between the first start and the retire (with 0.05 s tasks,
    # 1 s of work, it once did on a loaded machine: nothing was left to purge).
    for _ in range(40):
        send(tasks.record, user_id=1, project_id=project_id, kwargs={"tag": "r", "sleep": 0.5})
    assert wait_for(lambda: tasks.started("r"))

    project_tombstone(project_id)  # as a deletion does, first
    purged = active.retire_project(project_id)

    assert purged > 0
    assert wait_for(lambda: followed(live_worker) == set(), timeout=5)
    assert active.queue_depth(project_id) == 0
    # Tasks already with the worker end (run or skipped); then nothing is left to run.
    assert wait_for(
        lambda: not worker_state.active_requests and not worker_state.reserved_requests,
        timeout=10,
    )
    assert len(tasks.effects("r")) + purged <= 40
    assert active.queue_depth(project_id) == 0
    ran = len(tasks.effects("r"))
    assert not worker_state.active_requests and not worker_state.reserved_requests
    assert len(tasks.effects("r")) == ran


def test_tasks_of_a_tombstoned_project_are_skipped_before_they_run(
    request, redis_client, bus_broker
):
    deleted, alive = uuid.uuid4(), uuid.uuid4()
    for _ in range(5):
        send(tasks.record, user_id=1, project_id=deleted, kwargs={"tag": "gone"})
    send(tasks.record, user_id=1, project_id=alive, kwargs={"tag": "alive"})
    project_tombstone(deleted)

    request.getfixturevalue("live_worker")  # the worker starts with the messages queued

    assert wait_for(lambda: tasks.effects("alive"))
    # On RabbitMQ the broker holds unacknowledged messages; on Redis kombu's `unacked`.
    assert wait_for(
        lambda: (
            active.queue_depth(deleted) == 0
            and (bus_broker == "amqp" or not redis_client.hlen("unacked"))
        )
    )
    assert tasks.started("gone") == []  # the body never began
    assert tasks.effects("gone") == []


def test_the_reaper_retires_idle_queues_and_a_later_publish_revives_them(settings, live_worker):
    settings.AGENTBUS_QUEUE_IDLE_SECONDS = 0.2
    project_id = uuid.uuid4()
    queue = project_queue(project_id)
    send(tasks.record, user_id=1, project_id=project_id, kwargs={"tag": "a"})
    assert wait_for(lambda: tasks.effects("a"))
    # Acknowledged (the task acks late): a message in flight keeps its queue from the reaper.
    assert wait_for(lambda: queue not in unacked_queues(broker_redis()))
    time.sleep(0.3)  # idle past AGENTBUS_QUEUE_IDLE_SECONDS

    # Beat's task, through the maintenance queue, on the worker.
    reap_idle_queues.delay()

    assert wait_for(lambda: active.active_queues() == [], timeout=5)
    assert wait_for(lambda: followed(live_worker) == set(), timeout=5)
    task_id = send(tasks.record, user_id=1, project_id=project_id, kwargs={"tag": "b"})
    assert wait_for(lambda: tasks.effects("b")) == [task_id]
    assert wait_for(lambda: followed(live_worker) == {queue}, timeout=5)


def test_no_task_is_stranded_while_the_reaper_races_producers(live_worker):
    """Bursts of publishes with idle gaps, the reaper retiring the queue in every gap:
    each burst's first publish re-activates and re-announces it. Only the reaper runs
    (not the rescue of stranded queues), so a stranded message would stay stranded."""
    project_id = uuid.uuid4()
    stop = threading.Event()
    retirements = []

    def reaper():
        while not stop.is_set():
            retirements.extend(active.reap_idle_queues(idle_seconds=0.15))
            time.sleep(0.01)

    thread = threading.Thread(target=reaper)
    thread.start()
    sent = []
    try:
        for _burst in range(8):
            for _ in range(5):
                sent.append(
                    send(tasks.record, user_id=1, project_id=project_id, kwargs={"tag": "race"})
                )
            # An idle gap: it lasts until the reaper has retired the queue.
            before = len(retirements)
            assert wait_for(lambda before=before: len(retirements) > before, timeout=10)
        assert wait_for(lambda: len(tasks.effects("race")) == len(sent), timeout=10)
    finally:
        stop.set()
        thread.join()
    assert sorted(tasks.effects("race")) == sorted(sent)
    assert len(retirements) >= 4  # the race really happened


def test_a_backlog_does_not_starve_another_project(request):
    busy, quiet = uuid.uuid4(), uuid.uuid4()
    for _ in range(600):
        send(tasks.record, user_id=1, project_id=busy, kwargs={"tag": "busy", "sleep": 0.005})
    # The worker starts with the backlog queued (publishing may be slower than running).
    request.getfixturevalue("live_worker")
    assert wait_for(lambda: len(tasks.started("busy")) >= 10)

    sent_at = time.time()
    send(tasks.record, user_id=2, project_id=quiet, kwargs={"tag": "quiet"})
    assert wait_for(lambda: tasks.started("quiet"), timeout=10)

    quiet_started = tasks.started("quiet")[0]["at"]
    overtaking = [s for s in tasks.started("busy") if sent_at < s["at"] < quiet_started]
    # Round robin: at most the busy tasks already fetched or running run first, and those
    # (5 ms each) that ran while the worker began to follow the new queue: on RabbitMQ a
    # broadcast and a consume, which took 14 tasks' time once on a loaded machine. A
    # starved project would wait for the hundreds left.
    assert len(overtaking) <= 24, len(overtaking)
    # ...while a backlog still waited behind it (counted at the quiet task's start, not
    # when this test gets to look: the worker goes on draining meanwhile). How much ran
    # before the quiet task was sent depends on the machine's pace, not on fairness: a
    # loaded machine let 271 of 300 run first, so the backlog is twice that.
    before_quiet = [s for s in tasks.started("busy") if s["at"] < quiet_started]
    assert len(before_quiet) <= 550, len(before_quiet)


def test_a_retried_agent_task_goes_back_to_its_project_queue(live_worker, redis_client):
    project_id = uuid.uuid4()
    task_id = tasks.flaky.delay(user_id=1, project_id=project_id, tag="retry").id

    assert wait_for(lambda: tasks.effects("retry")) == [task_id]
    runs = tasks.started("retry")
    assert [r["attempt"] for r in runs] == [1, 2]
    assert {r["routing_key"] for r in runs} == {project_queue(project_id)}
    assert {r["id"] for r in runs} == {task_id}
