"""agentbus.transport, the one module that knows kombu's private layout, checked against
what the installed kombu itself does (its own methods are called, never copied)."""

from __future__ import annotations

import json
import time
import uuid

import pytest
import redis
from kombu import Connection, Consumer, Producer
from kombu.transport import redis as kombu_redis

from agentbus import transport
from agentbus.guard import project_tombstone
from agentbus.keys import BULK_SUFFIX
from agentbus.queues import direct_queue, project_queue
from agentbus.transport import CHECKED_HEADER, GONE_HEADER, Channel, Transport
from config.celery_app import app
from tests.agentbus import tasks
from tests.redis_server import private_redis


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


class Capture:
    """Stands where a channel's Redis client is, recording what would be sent."""

    def __init__(self):
        self.sent: list[bytes] = []
        self.connection = self

    def send_packed_command(self, command):
        self.sent.append(b"".join(command))

    def send_command(self, *args):
        self.send_packed_command(redis.Connection()._command_packer.pack(*args))


def _sent_by(channel, brpop_start) -> bytes:
    capture = Capture()
    channel.__dict__["client"] = capture
    try:
        brpop_start(channel)
    finally:
        del channel.__dict__["client"]
        channel._in_poll = None
    [command] = capture.sent
    return command


def test_the_installed_kombu_is_one_this_transport_was_checked_against(connection):
    assert transport.kombu_tested(), "check agentbus.transport against this kombu, then add it"
    assert connection.default_channel.takes_over


def test_the_brpop_is_kombus_own_plus_the_wake_key(connection):
    channel = connection.default_channel
    queues = [project_queue(uuid.uuid4()) for _ in range(50)]
    consumer = Consumer(channel, queues=[direct_queue(q) for q in queues], callbacks=[])
    consumer.consume()

    ours = _sent_by(channel, Channel._brpop_start)
    kombus = _sent_by(channel, kombu_redis.Channel._brpop_start)  # the real method

    packer = redis.Connection()._command_packer
    *_, timeout = [channel.brpop_timeout]
    # kombu's command is BRPOP <keys> <timeout>; ours inserts the project queues' bulk
    # lanes (after every interactive list: BRPOP serves the first non-empty key) and the
    # wake key before the timeout, and is otherwise byte for byte the same.
    suffix = b"".join(packer.pack(str(timeout)))[len(b"*1\r\n") :]
    assert kombus.endswith(suffix) and ours.endswith(suffix)

    def packed(key: str) -> bytes:
        return b"".join(packer.pack(key))[len(b"*1\r\n") :]

    kombu_keys = kombus[kombus.index(b"BRPOP\r\n") + 7 : -len(suffix)]
    ours_keys = ours[ours.index(b"BRPOP\r\n") + 7 : -len(suffix)]
    cycle = channel._queue_cycle.items
    bulk = b"".join(packed(q + BULK_SUFFIX) for q in cycle)
    assert ours_keys == kombu_keys + bulk + packed(channel.wake_key)
    assert kombus.startswith(b"*%d\r\n" % (len(queues) + 2))
    assert ours.startswith(b"*%d\r\n" % (2 * len(queues) + 3))
    consumer.cancel()


@pytest.mark.parametrize(
    "options",
    [
        {"priority_steps": [0]},
        {"priority_steps": [0, 3, 6, 9]},
        {"priority_steps": [0, 5], "sep": ":"},
        {"priority_steps": [0], "global_keyprefix": "pfx:"},
    ],
)
def test_queue_keys_are_the_lists_kombu_writes(settings, options):
    settings.CELERY_BROKER_TRANSPORT_OPTIONS = options
    with Connection(app.conf.broker_url, transport_options=options) as conn:
        channel = conn.default_channel
        queue = project_queue(uuid.uuid4())
        prefix = options.get("global_keyprefix", "")
        expected = [prefix + channel._q_for_pri(queue, p) for p in channel.priority_steps]
        assert transport.queue_keys(queue) == expected
        assert {transport.queue_of_key(k) for k in expected} == {queue}


def test_unacked_queues_reads_what_kombu_records_for_a_delivered_message(redis_client):
    queue = project_queue(uuid.uuid4())
    options = app.conf.broker_transport_options
    with Connection(app.conf.broker_url, transport_options=options) as conn:
        Producer(conn.default_channel).publish(
            "x", exchange="", routing_key=queue, serializer="json"
        )
        message = conn.default_channel.basic_get(queue, no_ack=False)  # delivered, not acked
        assert message is not None
        assert queue in transport.unacked_queues(redis_client)
        message.ack()
    assert queue not in transport.unacked_queues(redis_client)


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
    deleted, alive = uuid.uuid4(), uuid.uuid4()
    producer = Producer(connection.default_channel)
    for project in (deleted, alive):
        queue = project_queue(project)
        producer.publish("x", exchange="", routing_key=queue, serializer="json")
    project_tombstone(deleted)

    for project in (deleted, alive):
        queue = project_queue(project)
        raw = json.loads(redis_client.rpop(queue))  # popped, and no consumer any more
        connection.transport._deliver(raw, queue)

    assert redis_client.llen(project_queue(deleted)) == 0
    assert redis_client.llen(project_queue(alive)) == 1
    assert redis_client.hlen("unacked") == 0


class SlowPollTransport(Transport):
    # A long BRPOP timeout, so a wake-up that did not happen would show.
    brpop_timeout = 5


def _first_delivery_after_follow(url: str, *, wake: bool) -> float:
    """Seconds from following a new queue (while a BRPOP over another is in flight) and
    publishing to it, to its message arriving."""
    followed, new = project_queue(uuid.uuid4()), project_queue(uuid.uuid4())
    recorder = Recorder()
    with Connection(
        url, transport=SlowPollTransport, transport_options={"priority_steps": [0]}
    ) as conn:
        channel = conn.default_channel
        consumer = Consumer(
            channel, queues=[direct_queue(followed)], callbacks=[recorder], accept=["json"]
        )
        consumer.consume()
        with pytest.raises(TimeoutError):
            conn.drain_events(timeout=0.3)  # the BRPOP over `followed` stays in flight
        consumer.add_queue(direct_queue(new))
        consumer.consume()
        if wake:
            assert transport.wake(channel)
        started = time.monotonic()
        with Connection(url) as publisher:
            Producer(publisher.default_channel).publish(
                "hello", exchange="", routing_key=new, serializer="json"
            )
        while not recorder.bodies and time.monotonic() - started < 10:
            try:
                conn.drain_events(timeout=10)
            except TimeoutError:
                break
        consumer.cancel()
    assert recorder.bodies == ["hello"]
    return time.monotonic() - started


def test_waking_the_poll_needs_no_client_command():
    """Managed Redis services refuse CLIENT (@admin, @dangerous) to ordinary users: the
    wake-up is a push to the channel's own key, which any user with key access may do."""
    with private_redis() as server:
        admin = server.client()
        admin.acl_setuser(
            "agentbus", enabled=True, passwords=["+secret"], keys=["*"], channels=["*"],
            commands=["+@all", "-@admin", "-@dangerous"],
        )  # fmt: skip
        limited = server.url_for("agentbus", "secret")
        with pytest.raises(redis.exceptions.NoPermissionError):
            redis.Redis.from_url(limited).client_list()

        woken = _first_delivery_after_follow(limited, wake=True)
        unwoken = _first_delivery_after_follow(limited, wake=False)
    assert woken < 1.0
    assert unwoken > 2.0  # what waking saves: the rest of the BRPOP timeout


def test_a_wake_up_is_not_a_message(connection, redis_client):
    queue = project_queue(uuid.uuid4())
    recorder = Recorder()
    consumer = Consumer(
        connection.default_channel, queues=[direct_queue(queue)], callbacks=[recorder],
        accept=["json"],
    )  # fmt: skip
    consumer.consume()
    connection.default_channel.wake()
    connection.drain_events(timeout=2)  # the wake-up ends the poll, and delivers nothing
    assert recorder.bodies == []
    assert redis_client.llen(connection.default_channel.wake_key) == 0
    consumer.cancel()


def test_another_kombu_gets_kombus_own_poll(connection, monkeypatch):
    monkeypatch.setattr(transport, "KOMBU_TESTED", ("0.0.",))
    channel = connection.default_channel
    assert not channel.takes_over
    assert not channel.wake()
    consumer = Consumer(channel, queues=[direct_queue(project_queue(uuid.uuid4()))])
    consumer.consume()
    assert _sent_by(channel, Channel._brpop_start) == _sent_by(
        channel, kombu_redis.Channel._brpop_start
    )
    consumer.cancel()


def test_the_worker_warns_once_about_an_untested_kombu(monkeypatch, caplog):
    monkeypatch.setattr(transport, "KOMBU_TESTED", ("0.0.",))
    assert transport.check_kombu() is False
    assert "kombu's own channel" in caplog.text


def test_wake_ups_do_not_pile_up(connection, redis_client):
    channel = connection.default_channel
    for _ in range(20):  # several follows before the poll runs again
        channel.wake()
    assert redis_client.llen(channel.wake_key) == 1
    assert 0 < redis_client.ttl(channel.wake_key) <= transport.WAKE_TTL_SECONDS


def test_a_delivery_is_recorded_as_kombu_records_it_and_says_whether_the_project_is_gone(
    redis_client,
):
    """QoS.append writes kombu's own unacked entries (compared with kombu's own method
    on the same message) and tells the task, in the same round trip, about its project."""
    alive, gone = uuid.uuid4(), uuid.uuid4()
    project_tombstone(gone)
    options = app.conf.broker_transport_options
    recorded = {}
    for label, transport_cls in (("ours", Transport), ("kombu", kombu_redis.Transport)):
        with Connection(
            app.conf.broker_url, transport=transport_cls, transport_options=options
        ) as conn:
            channel = conn.default_channel
            for project in (alive, gone):
                queue = project_queue(project)
                # Sent by kombu's own channel (ours refuses a deleted project's message).
                with Connection(app.conf.broker_url, transport_options=options) as plain:
                    Producer(plain.default_channel).publish(
                        "x", exchange="", routing_key=queue, serializer="json", headers={"id": "t"}
                    )
                message = channel.basic_get(queue, no_ack=False)
                raw = redis_client.hget("unacked", message.delivery_tag)
                recorded[(label, project)] = (json.loads(raw), dict(message.headers))
                message.ack()
    for project in (alive, gone):
        ours, kombus = recorded[("ours", project)], recorded[("kombu", project)]
        entry = lambda e: [  # noqa: E731  (the stored message minus its per-delivery ids)
            {k: v for k, v in e[0].items() if k != "properties"},
            e[1],
            e[2],
        ]
        assert entry(ours[0]) == entry(kombus[0])
        assert GONE_HEADER not in kombus[1]
        assert ours[1][GONE_HEADER] is (project == gone)
        assert time.time() - ours[1][CHECKED_HEADER] < 5


def test_a_task_rechecks_a_stale_delivery_answer(project_id):
    project_tombstone(project_id)
    task = tasks.record
    task.push_request(agentbus_gone=False, agentbus_checked_at=time.time())
    try:
        assert task._project_gone(project_id) is False  # fresh: the delivery's answer
    finally:
        task.pop_request()
    task.push_request(agentbus_gone=False, agentbus_checked_at=time.time() - 60)
    try:
        assert task._project_gone(project_id) is True  # stale: asked again
    finally:
        task.pop_request()
    task.push_request()
    try:
        assert task._project_gone(project_id) is True  # no answer delivered: asked
    finally:
        task.pop_request()


def test_many_queues_are_followed_with_one_rebuild_of_the_cycle(connection):
    channel = connection.default_channel
    queues = [project_queue(uuid.uuid4()) for _ in range(3000)]
    consumer = Consumer(channel, queues=[direct_queue(q) for q in queues], callbacks=[])
    rebuilt = []
    real = channel._queue_cycle.update
    channel._queue_cycle.update = lambda items: (rebuilt.append(len(items)), real(items))
    with transport.batched(channel):
        consumer.consume()
    assert rebuilt == [len(queues)]
    assert channel._queue_cycle.items == channel.active_queues == queues
    with transport.batched(channel):
        for queue in queues[:1000]:
            consumer.cancel_by_queue(queue)
    assert rebuilt == [len(queues), 2000]
    assert channel._queue_cycle.items == queues[1000:]
    consumer.cancel()


@pytest.mark.parametrize("channel_class", [kombu_redis.Channel, Channel])
def test_a_channel_closed_after_its_transport_was_detached_gives_its_messages_back(
    redis_client, channel_class, monkeypatch
):
    """What a worker does when it loses the broker: Celery detaches the transport from
    its connection (`Connection.collect`), then closes the connection; a channel that
    closes after that must still put its unacknowledged messages back. kombu's own
    channel raises AttributeError there (which stopped the whole worker)."""
    monkeypatch.setattr(Transport, "Channel", channel_class)
    queue = direct_queue(f"uws.test.{uuid.uuid4().hex}")
    with Connection(app.conf.broker_url, transport=Transport) as conn:
        channel = conn.default_channel
        Producer(channel).publish({"n": 1}, routing_key=queue.name, declare=[queue])
        held = []
        with Consumer(channel, [queue], callbacks=[lambda body, m: held.append(m)]):
            conn.drain_events(timeout=2)
        assert len(held) == 1 and redis_client.llen(queue.name) == 0
        channel._disconnect_pools()
        conn.transport.client = None  # what Connection._do_close_transport does
        if channel_class is kombu_redis.Channel:
            with pytest.raises(AttributeError):
                channel.close()
            return
        channel.close()
    assert redis_client.llen(queue.name) == 1  # back on its queue
    redis_client.delete(queue.name)
