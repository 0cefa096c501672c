"""The ready list (agentbus.transport): a shared worker takes project tasks from a list
of the queues that hold messages, so no poll names an idle queue. Checked at kombu's
level (commands sent, what Redis holds, kombu's own restore) and with a real worker."""

from __future__ import annotations

import contextlib
import json
import time
import uuid

import pytest
from kombu import Connection, Consumer, Producer

from agentbus import ProjectGone, active, project_tombstone, retire_project
from agentbus.keys import READY_BELL_KEY, READY_KEY, READY_MEMBERS_KEY
from agentbus.queues import MAINTENANCE_QUEUE, direct_queue, project_queue
from agentbus.transport import Channel, Transport
from config.celery_app import app
from tests.agentbus import tasks
from tests.agentbus.conftest import send, wait_for
from tests.agentbus.test_shared_worker import followed


class Recorder:
    def __init__(self):
        self.messages = []

    def __call__(self, body, message):
        self.messages.append(message)
        message.ack()

    @property
    def queues(self) -> list[str]:
        return [m.delivery_info["routing_key"] for m in self.messages]


class Capture:
    """Stands where a channel's Redis client is, recording what would be sent."""

    def __init__(self):
        self.sent: list[bytes] = []
        self.connection = self

    def send_packed_command(self, command):
        self.sent.append(b"".join(command))


@pytest.fixture
def connection():
    with Connection(
        app.conf.broker_url,
        transport=Transport,
        transport_options=app.conf.broker_transport_options,
    ) as conn:
        yield conn


@pytest.fixture
def shared(connection):
    """A channel polling as a shared worker's does: its own (maintenance) queue plus the
    ready list. Yields (connection, channel, recorder, consumer)."""
    channel = connection.default_channel
    recorder = Recorder()
    consumer = Consumer(
        channel, queues=[direct_queue(MAINTENANCE_QUEUE)], callbacks=[recorder], accept=["json"]
    )
    consumer.consume()
    assert channel.use_ready_list()
    yield connection, channel, recorder, consumer
    consumer.cancel()


def drain(connection, recorder, count: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while len(recorder.messages) < count and time.monotonic() < deadline:
        with contextlib.suppress(TimeoutError):
            connection.drain_events(timeout=0.5)


def _record(*, project_id, tag: str = "") -> None:
    send(tasks.record, user_id=1, project_id=project_id, kwargs={"tag": tag})


def test_publish_writes_the_message_and_lists_the_queue_once(project_id, redis_client):
    queue = project_queue(project_id)
    for _ in range(3):
        _record(project_id=project_id)
    assert redis_client.llen(queue) == 3
    assert redis_client.lrange(READY_KEY, 0, -1) == [queue]
    assert redis_client.smembers(READY_MEMBERS_KEY) == {queue}
    assert redis_client.llen(READY_BELL_KEY) == 1  # at most one token
    assert active.active_among([queue]) == {queue}

    project_tombstone(project_id)
    with pytest.raises(ProjectGone):
        _record(project_id=project_id)
    assert redis_client.llen(queue) == 3


def test_a_busy_project_among_many_idle_ones_is_taken_without_naming_them(shared, redis_client):
    connection, channel, recorder, _ = shared
    idle = [direct_queue(project_queue(uuid.uuid4())) for _ in range(2000)]
    followers = Consumer(channel, queues=idle, callbacks=[recorder], accept=["json"])
    followers.consume()  # the worker follows 2,000 idle project queues
    busy = uuid.uuid4()
    for _ in range(20):
        _record(project_id=busy)

    capture = Capture()
    channel.__dict__["client"] = capture
    try:
        Channel._brpop_start(channel)
    finally:
        del channel.__dict__["client"]
        channel._in_poll = None
    [take] = capture.sent
    assert b"EVALSHA" in take and READY_KEY.encode() in take
    # No project queue is named (the prefix is the script's argument): the size of a
    # poll is not the number of queues followed.
    assert take.count(b"uws.project.") == 1 and b"uws.project.\r\n" in take
    assert len(take) < 600  # a fixed size (the flow-control keys included)

    started = time.monotonic()
    drain(connection, recorder, 20)
    assert recorder.queues == [project_queue(busy)] * 20
    assert time.monotonic() - started < 3
    assert redis_client.llen(READY_KEY) == 0 and not redis_client.smembers(READY_MEMBERS_KEY)
    followers.cancel()


def test_two_busy_projects_take_turns(shared):
    connection, _, recorder, _ = shared
    a, b = uuid.uuid4(), uuid.uuid4()
    for _ in range(5):
        _record(project_id=a)
    for _ in range(5):
        _record(project_id=b)
    drain(connection, recorder, 10)
    assert recorder.queues == [project_queue(a), project_queue(b)] * 5


def test_the_maintenance_queue_is_served_first_and_sleeping_costs_one_brpop(shared, redis_client):
    connection, channel, recorder, _ = shared
    project = uuid.uuid4()
    _record(project_id=project)
    with Connection(app.conf.broker_url) as plain:
        Producer(plain.default_channel).publish(
            "m", exchange="", routing_key=MAINTENANCE_QUEUE, serializer="json"
        )
    drain(connection, recorder, 2)
    assert recorder.queues == [MAINTENANCE_QUEUE, project_queue(project)]

    # Nothing left: the next poll blocks on our queue, the bell and the wake key only.
    with contextlib.suppress(TimeoutError):
        connection.drain_events(timeout=0.3)
    assert channel._idle
    capture = Capture()
    channel.__dict__["client"] = capture
    try:
        Channel._brpop_start(channel)
    finally:
        del channel.__dict__["client"]
        channel._in_poll = None
    [block] = capture.sent
    assert block.startswith(b"*5\r\n$5\r\nBRPOP\r\n")  # BRPOP, 3 keys, timeout
    assert READY_BELL_KEY.encode() in block and MAINTENANCE_QUEUE.encode() in block


def test_a_take_is_recorded_as_kombu_records_a_delivery_and_kombu_restores_it(shared, redis_client):
    """The take writes kombu's unacked entry in the same step as the pop; kombu's own
    restore (the visibility timeout's) puts the message back, listed again."""
    connection, channel, recorder, _ = shared
    project = uuid.uuid4()
    queue = project_queue(project)
    _record(project_id=project)
    held = []
    channel.connection._callbacks[MAINTENANCE_QUEUE], real = (
        lambda raw: held.append(raw),
        channel.connection._callbacks[MAINTENANCE_QUEUE],
    )
    try:
        with contextlib.suppress(TimeoutError):
            connection.drain_events(timeout=2)
    finally:
        channel.connection._callbacks[MAINTENANCE_QUEUE] = real
    [raw] = held  # taken, never acknowledged (a worker that died holding it)
    tag = raw["properties"]["delivery_tag"]
    stored, exchange, routing_key = json.loads(redis_client.hget("unacked", tag))
    assert (exchange, routing_key) == ("", queue)
    assert stored == {k: v for k, v in raw.items() if k != "headers"} | {
        "headers": {k: v for k, v in raw["headers"].items() if not k.startswith("agentbus_")}
    }
    assert redis_client.zscore("unacked_index", tag) is not None
    assert redis_client.llen(queue) == 0 and redis_client.llen(READY_KEY) == 0

    channel._recorded.clear()
    channel.qos.restore_by_tag(tag)  # kombu's own method, as restore_visible calls it
    assert redis_client.llen(queue) == 1
    assert redis_client.lrange(READY_KEY, 0, -1) == [queue]
    assert redis_client.hget("unacked", tag) is None
    drain(connection, recorder, 1)
    assert recorder.queues == [queue]
    assert recorder.messages[0].delivery_info.get("redelivered") is True


def test_the_take_purges_a_deleted_projects_queue(shared, redis_client):
    connection, _, recorder, _ = shared
    deleted, alive = uuid.uuid4(), uuid.uuid4()
    for _ in range(3):
        _record(project_id=deleted)
    _record(project_id=alive)
    project_tombstone(deleted)
    drain(connection, recorder, 1)
    with contextlib.suppress(TimeoutError):
        connection.drain_events(timeout=0.3)
    assert recorder.queues == [project_queue(alive)]
    assert redis_client.llen(project_queue(deleted)) == 0
    assert not redis_client.smembers(READY_MEMBERS_KEY)
    assert redis_client.hlen("unacked") == 0


def test_retiring_a_project_takes_it_off_the_ready_list(project_id, redis_client):
    _record(project_id=project_id)
    project_tombstone(project_id)
    assert retire_project(project_id) == 1
    assert redis_client.llen(READY_KEY) == 0 and not redis_client.smembers(READY_MEMBERS_KEY)


def test_the_sweep_lists_messages_sent_around_publish(shared, redis_client, project_id):
    connection, _, recorder, _ = shared
    queue = project_queue(project_id)
    active.mark_active(project_id)
    with Connection(app.conf.broker_url) as plain:  # a plain apply_async's LPUSH
        Producer(plain.default_channel).publish(
            "stray", exchange="", routing_key=queue, serializer="json"
        )
    assert redis_client.llen(READY_KEY) == 0
    assert active.sweep_ready(force=True) == 1
    assert active.sweep_ready(force=True) == 0  # listed once
    drain(connection, recorder, 1)
    assert recorder.queues == [queue]
    assert active.sweep_ready() is not None and active.sweep_ready() is None  # once a period


def test_a_restarted_redis_reloads_the_take(shared, redis_client):
    connection, _, recorder, _ = shared
    redis_client.script_flush()
    project = uuid.uuid4()
    _record(project_id=project)
    drain(connection, recorder, 1)
    assert recorder.queues == [project_queue(project)]


# --- with a real worker ---------------------------------------------------------------------


@pytest.mark.slow
def test_a_worker_following_many_idle_queues_runs_a_busy_projects_tasks_promptly(
    live_worker, redis_client
):
    idle = [uuid.uuid4() for _ in range(1000)]
    for project in idle:
        active.mark_active(project)
    assert wait_for(lambda: len(followed(live_worker)) == len(idle), timeout=20)
    busy = uuid.uuid4()
    started = time.monotonic()
    for _ in range(50):
        _record(project_id=busy, tag="busy")
    assert wait_for(lambda: len(tasks.effects("busy")) == 50, timeout=20)
    assert time.monotonic() - started < 10  # was minutes with a window poll


@pytest.mark.slow
def test_a_message_put_back_after_the_visibility_timeout_runs(request, redis_client):
    """A message left in `unacked` (its worker died holding it) comes back through
    kombu's own restore and is run, without any publish ringing for it."""
    project = uuid.uuid4()
    queue = project_queue(project)
    with Connection(
        app.conf.broker_url,
        transport=Transport,
        transport_options={**app.conf.broker_transport_options, "visibility_timeout": 0},
    ) as conn:
        channel = conn.default_channel
        _record(project_id=project, tag="restored")
        # Another worker took it and died (what its take left behind).
        raw = redis_client.rpop(queue)
        redis_client.srem(READY_MEMBERS_KEY, queue)
        redis_client.lrem(READY_KEY, 0, queue)
        tag = json.loads(raw)["properties"]["delivery_tag"]
        redis_client.hset("unacked", tag, json.dumps([json.loads(raw), "", queue]))
        redis_client.zadd("unacked_index", {tag: time.time() - 10})
        request.getfixturevalue("live_worker")
        assert redis_client.llen(queue) == 0  # nothing for the worker to see yet
        channel.qos.restore_visible(num=10, interval=1)  # kombu's own sweep
    assert wait_for(lambda: tasks.effects("restored"), timeout=10)


@pytest.mark.slow
def test_a_deleted_projects_queued_tasks_never_run(live_worker, redis_client, settings):
    deleted, alive = uuid.uuid4(), uuid.uuid4()
    for _ in range(30):
        send(tasks.record, user_id=1, project_id=deleted, kwargs={"tag": "gone", "sleep": 0.01})
    assert wait_for(lambda: tasks.started("gone"))  # some run, the rest wait in the queue
    project_tombstone(deleted)  # what the delete does before it answers 204
    deleted_at = time.time()
    _record(project_id=alive, tag="alive")
    assert wait_for(lambda: tasks.effects("alive"))
    # Nothing of it left anywhere (queued, or delivered and not acknowledged).
    assert wait_for(
        lambda: not redis_client.llen(project_queue(deleted)) and not redis_client.hlen("unacked")
    )
    fresh = settings.AGENTBUS_GUARD_FRESH_SECONDS
    late = [s for s in tasks.started("gone") if s["at"] > deleted_at + fresh]
    assert late == []
    assert len(tasks.started("gone")) < 30


@pytest.mark.slow
def test_two_busy_projects_share_the_worker(request):
    a, b = uuid.uuid4(), uuid.uuid4()
    for _ in range(40):
        send(tasks.record, user_id=1, project_id=a, kwargs={"tag": "ab", "sleep": 0.002})
    for _ in range(40):
        send(tasks.record, user_id=2, project_id=b, kwargs={"tag": "ab", "sleep": 0.002})
    request.getfixturevalue("live_worker")  # starts with both backlogs queued, a's first
    assert wait_for(lambda: len(tasks.effects("ab")) == 80, timeout=20)
    order = [s["project_id"] for s in tasks.started("ab")]
    first_b = order.index(str(b))
    assert first_b <= 4, order[:10]  # b did not wait behind a's 40
    # Alternating once both are listed: neither runs more than a few in a row.
    assert max(_runs(order[first_b:60])) <= 4


def _runs(seq):
    run, last = 0, None
    for item in seq:
        run = run + 1 if item == last else 1
        last = item
        yield run
