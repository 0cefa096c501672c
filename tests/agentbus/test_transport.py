"""workspaces.transport: kombu's Redis channel with a cached BRPOP, consuming for real."""

from __future__ import annotations

import uuid

import pytest
import redis
from kombu import Connection, Consumer, Producer

from config.celery_app import app
from workspaces.queues import direct_queue, project_queue
from workspaces.transport import Channel, Transport


@pytest.fixture
def connection():
    with Connection(
        app.conf.broker_url,
        transport=Transport,
        transport_options=app.conf.broker_transport_options,
    ) as conn:
        yield conn


class Recorder:
    def __init__(self):
        self.bodies: list[str] = []

    def __call__(self, body, message):
        self.bodies.append(body)
        message.ack()


def test_the_brpop_is_the_one_kombu_sends(connection):
    channel = connection.default_channel
    assert isinstance(channel, Channel)
    queues = [project_queue(uuid.uuid4()) for _ in range(50)]
    consumer = Consumer(channel, queues=[direct_queue(q) for q in queues], callbacks=[])
    consumer.consume()

    sent = []

    class Capture:
        def send_packed_command(self, command):
            sent.append(b"".join(command))

    class Client:
        connection = Capture()

    channel.__dict__["client"] = Client()
    try:
        channel._brpop_start()
    finally:
        del channel.__dict__["client"]
        channel._in_poll = None
    order = channel._queue_cycle.consume(len(channel.active_queues))
    kombu_args = ["BRPOP", *(channel._q_for_pri(q, 0) for q in order), channel.brpop_timeout]
    expected = b"".join(redis.Connection()._command_packer.pack(*kombu_args))
    assert sent == [expected]
    consumer.cancel()


def test_round_robin_delivery_across_queues_added_and_cancelled(connection, redis_client):
    names = [project_queue(uuid.uuid4()) for _ in range(3)]
    producer = Producer(connection.default_channel)
    for name in names:
        for i in range(3):
            producer.publish(f"{name}:{i}", exchange="", routing_key=name, serializer="json")
    recorder = Recorder()
    consumer = Consumer(
        connection.default_channel, queues=[direct_queue(n) for n in names[:2]],
        callbacks=[recorder], accept=["json"],
    )  # fmt: skip
    consumer.consume()

    for _ in range(4):
        connection.drain_events(timeout=2)
    # Alternating between the two queues followed, in publish order within each.
    assert [b.split(":")[0] for b in recorder.bodies] in (
        [names[0], names[1]] * 2,
        [names[1], names[0]] * 2,
    )

    consumer.cancel_by_queue(names[0])
    consumer.add_queue(direct_queue(names[2]))
    consumer.consume()
    for _ in range(4):
        connection.drain_events(timeout=2)
    later = [b.split(":")[0] for b in recorder.bodies[4:]]
    assert sorted(later) == sorted([names[1], names[2], names[2], names[2]])
    assert redis_client.llen(names[0]) == 1  # no longer consumed
    consumer.cancel()


def test_a_message_for_a_cancelled_queue_of_a_deleted_project_is_dropped(connection, redis_client):
    """What a BRPOP sent before the consumer was cancelled hands back: kombu puts it
    back in its queue, except when the project was deleted meanwhile."""
    import json

    from workspaces.bus import get_agent_bus

    deleted, alive = uuid.uuid4(), uuid.uuid4()
    producer = Producer(connection.default_channel)
    for project in (deleted, alive):
        queue = project_queue(project)
        producer.publish("x", exchange="", routing_key=queue, serializer="json")
    get_agent_bus().tombstone_project(deleted)

    for project in (deleted, alive):
        queue = project_queue(project)
        raw = json.loads(redis_client.rpop(queue))  # popped, and no consumer any more
        connection.transport._deliver(raw, queue)

    assert redis_client.llen(project_queue(deleted)) == 0
    assert redis_client.llen(project_queue(alive)) == 1
    assert redis_client.hlen("unacked") == 0
