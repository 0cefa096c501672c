"""The AgentBus on RabbitMQ, where it differs from Redis: queues are declared before a
publish, deleted at teardown, counted by the broker, a worker survives the broker
cancelling its consumer, and one that lost Redis (but not its broker) comes back as a
new incarnation, and health asks the broker itself. Skipped (with the reason) where no
RabbitMQ answers."""

from __future__ import annotations

import time
import uuid

import pytest
from amqp.exceptions import NotFound
from kombu import Connection

from agentbus import active, broker_health
from agentbus.active import ACTIVE_KEY, RETIRED_KEY
from agentbus.broker import AMQP_QUEUES_KEY, amqp_delete
from agentbus.guard import ProjectGone, project_tombstone
from agentbus.queues import project_queue
from config.celery_app import app
from tests.agentbus import tasks
from tests.agentbus.conftest import send, wait_for, worker_status
from tests.local_http import free_port
from tests.redis_server import private_redis
from tests.workers import broker_at

pytestmark = pytest.mark.parametrize("bus_broker", ["amqp"], indirect=True)


def queue_on_broker(queue: str) -> tuple[int, int] | None:
    """(messages, consumers) of a queue, or None when the broker has no such queue."""
    with Connection(app.conf.broker_url) as conn:
        try:
            _name, messages, consumers = conn.default_channel.queue_declare(
                queue=queue, passive=True
            )
        except NotFound:
            return None
    return messages, consumers


def test_a_publish_declares_the_project_queue_and_lands_in_it(bus_broker, project_id):
    assert queue_on_broker(project_queue(project_id)) is None
    task_id = send(tasks.record, user_id=7, project_id=project_id, kwargs={"tag": "x"})

    assert queue_on_broker(project_queue(project_id)) == (1, 0)
    assert active.queue_depth(project_id) == 1
    with Connection(app.conf.broker_url) as conn:
        message = conn.default_channel.basic_get(project_queue(project_id), no_ack=True)
    assert message.headers["id"] == task_id
    assert message.headers["task"] == "tests.agentbus.record"
    assert message.delivery_info["exchange"] == ""
    assert message.delivery_info["routing_key"] == project_queue(project_id)
    assert message.properties["delivery_mode"] == 2  # persistent, on a durable queue


def test_a_tombstoned_project_gets_no_message_and_no_queue(bus_broker, project_id):
    project_tombstone(project_id)
    with pytest.raises(ProjectGone):
        send(tasks.record, user_id=1, project_id=project_id)
    assert queue_on_broker(project_queue(project_id)) is None
    assert active.active_queues() == []


def test_retiring_a_project_deletes_its_queue(bus_broker, redis_client):
    gone, kept = uuid.uuid4(), uuid.uuid4()
    for _ in range(3):
        send(tasks.record, user_id=1, project_id=gone)
    send(tasks.record, user_id=1, project_id=kept)
    assert redis_client.sismember(AMQP_QUEUES_KEY, project_queue(gone))

    assert active.retire_project(gone) == 3

    assert queue_on_broker(project_queue(gone)) is None
    assert not redis_client.sismember(AMQP_QUEUES_KEY, project_queue(gone))
    assert queue_on_broker(project_queue(kept)) == (1, 0)
    assert active.retire_project(gone) == 0  # idempotent


def test_the_reaper_asks_the_broker_whether_a_queue_is_empty(bus_broker, redis_client):
    idle, waiting = uuid.uuid4(), uuid.uuid4()
    active.mark_active(idle)
    send(tasks.record, user_id=1, project_id=waiting)
    for project in (idle, waiting):
        redis_client.zadd(ACTIVE_KEY, {project_queue(project): time.time() - 100})

    assert active.reap_idle_queues(idle_seconds=50) == [project_queue(idle)]
    assert active.active_queues() == [project_queue(waiting)]


def test_a_full_scan_finds_declared_queues_the_active_set_lost(bus_broker, redis_client):
    stranded, deleted = uuid.uuid4(), uuid.uuid4()
    for project in (stranded, deleted):
        send(tasks.record, user_id=1, project_id=project)
    redis_client.delete(ACTIVE_KEY, RETIRED_KEY)  # the active set is lost
    project_tombstone(deleted)

    assert active.rescue_stranded_queues(full_scan=True) == [project_queue(stranded)]
    assert active.active_queues() == [project_queue(stranded)]
    assert queue_on_broker(project_queue(deleted)) is None  # a deleted project's: gone


@pytest.mark.slow
def test_a_worker_survives_the_broker_deleting_a_queue_it_consumes(
    bus_broker, settings, live_worker
):
    settings.AGENTBUS_RECONCILE_SECONDS = 3600  # only what the broker says moves it
    first, second = uuid.uuid4(), uuid.uuid4()
    send(tasks.record, user_id=1, project_id=first, kwargs={"tag": "first"})
    assert wait_for(lambda: tasks.effects("first"))
    assert wait_for(lambda: project_queue(first) in worker_status(live_worker.hostname)["queues"])
    consumer = live_worker.consumer
    restarts = consumer.restart_count

    # A teardown that deletes the queue before the worker heard the unfollow.
    amqp_delete(project_queue(first))

    assert wait_for(lambda: worker_status(live_worker.hostname)["queues"] == [], timeout=20)
    task_id = send(tasks.record, user_id=1, project_id=second, kwargs={"tag": "second"})
    assert wait_for(lambda: tasks.effects("second")) == [task_id]
    assert consumer.restart_count == restarts  # the same connection, no restart


@pytest.mark.slow
def test_a_worker_started_with_many_active_projects_follows_them_all(
    bus_broker, request, redis_client
):
    projects = [uuid.uuid4() for _ in range(1000)]
    for project in projects:
        active.mark_active(project)
    last = projects[-1]
    task_id = send(tasks.record, user_id=1, project_id=last, kwargs={"tag": "last"})

    worker = request.getfixturevalue("live_worker")

    assert wait_for(lambda: tasks.effects("last"), timeout=30) == [task_id]
    assert wait_for(
        lambda: len(worker_status(worker.hostname, timeout=5)["queues"]) == 1000, timeout=30
    )
    # The worker counts a queue followed once it sent the declare and basic.consume
    # (pipelined); the broker may still be working through them.
    oldest = project_queue(projects[0])  # used least recently: followed in the last step
    assert wait_for(lambda: queue_on_broker(oldest) == (0, 1), timeout=60)


def test_a_worker_that_lost_redis_comes_back_as_a_new_incarnation(
    bus_broker, worker_process, settings
):
    """Its consumer keeps its RabbitMQ connection through a Redis outage, so nothing
    reconnects; what the worker wrote to Redis meanwhile (a failed task given back, a
    task marked received) may be lost, and the work its incarnation holds would look
    held for good. Its first heartbeat that goes through makes it a new incarnation:
    the recovery passes send that work again."""
    suite_redis = settings.REDIS_URL
    with private_redis(appendonly=True) as redis_server:
        settings.REDIS_URL = redis_server.url
        try:
            _redis_outage(worker_process, redis_server)
        finally:
            settings.REDIS_URL = suite_redis  # the broker's teardown uses the suite's


def _redis_outage(worker_process, redis_server) -> None:
    worker = worker_process(
        "-Q", "uws.maintenance", "--agentbus-mode", "dedicated", "-P", "threads", "-c", "2",
        env={"AGENTBUS_HEARTBEAT_SECONDS": "0.5"},
    )  # fmt: skip
    worker.wait_started()

    def ids() -> list[str]:
        return [w["id"] for w in active.live_workers() if w["name"] == worker.name]

    before = wait_for(ids)
    assert len(before) == 1, worker.log()
    redis_server.stop()  # its data come back from the append-only file
    assert wait_for(lambda: "heartbeat failed" in worker.log_path.read_text()), worker.log()
    redis_server.start()
    after = wait_for(lambda: [i for i in ids() if i not in before], timeout=20)
    assert after, worker.log()
    assert "Redis answers again" in worker.log_path.read_text()
    assert worker_status(worker.name)["queues"] is not None  # the consumer went on


def test_health_asks_rabbitmq_itself(bus_broker, settings):
    """The broker check opens a connection to RabbitMQ: one that does not answer is
    unhealthy, though Redis (where the bus keeps its coordination state) answers."""
    assert broker_health()["healthy"] is True
    url = f"amqp://guest:guest@127.0.0.1:{free_port()}//"  # nothing listens there
    with broker_at(url):
        settings.CELERY_BROKER_URL = url
        report = broker_health()
    assert report["healthy"] is False and "Connection refused" in report["error"], report
