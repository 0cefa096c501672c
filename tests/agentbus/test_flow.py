"""Flow control on the AgentBus (agentbus.flow, the take of agentbus.transport): weights,
capped slots with leases, and lanes, checked on a real Redis through kombu's own
consumer machinery (the channel a shared worker polls with)."""

from __future__ import annotations

import contextlib
import time
import uuid

import pytest
from kombu import Connection, Consumer

from agentbus import publish, queue_depth
from agentbus.active import mark_active, sweep_ready
from agentbus.flow import flow_rules_set, flow_status
from agentbus.guard import project_tombstone
from agentbus.keys import (
    BULK_SUFFIX,
    FLOW_PARKED_KEY,
    FLOW_RULES_KEY,
    FLOW_STATS_KEY,
    READY_MEMBERS_KEY,
)
from agentbus.queues import MAINTENANCE_QUEUE, direct_queue, project_queue
from agentbus.transport import Transport, slots_key
from config.celery_app import app
from tests.agentbus import tasks
from tests.agentbus.conftest import send


class Holder:
    """A consumer's callback that keeps what it is given (acknowledging on demand)."""

    def __init__(self, *, ack: bool):
        self.ack = ack
        self.messages = []

    def __call__(self, body, message):
        self.messages.append(message)
        if self.ack:
            message.ack()

    def lanes(self) -> list[str]:
        return [m.headers.get("agentbus_lane") or "interactive" for m in self.messages]


@contextlib.contextmanager
def shared_channel(holder):
    with Connection(
        app.conf.broker_url,
        transport=Transport,
        transport_options=app.conf.broker_transport_options,
    ) as connection:
        channel = connection.default_channel
        consumer = Consumer(
            channel, queues=[direct_queue(MAINTENANCE_QUEUE)], callbacks=[holder], accept=["json"]
        )
        consumer.consume()
        assert channel.use_ready_list()
        yield connection, channel
        consumer.cancel()


def drain(connection, holder, count: int, timeout: float = 5.0) -> None:
    """Poll until `holder` has `count` messages or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while len(holder.messages) < count and time.monotonic() < deadline:
        with contextlib.suppress(TimeoutError):
            connection.drain_events(timeout=0.2)


def _project_of(message) -> str:
    return message.delivery_info["routing_key"]


def test_two_busy_projects_are_served_in_proportion_to_their_weights():
    heavy, light = uuid.uuid4(), uuid.uuid4()
    flow_rules_set(project_id=heavy, weight=3, max_in_flight=0)
    for _ in range(40):  # interleaved, as two saturating publishers would send
        send(tasks.record, project_id=heavy)
        send(tasks.record, project_id=light)
    holder = Holder(ack=True)
    with shared_channel(holder) as (connection, _channel):
        drain(connection, holder, 40)
    served = [_project_of(m) for m in holder.messages[:40]]
    assert served.count(project_queue(heavy)) == 30
    assert served.count(project_queue(light)) == 10
    # Turns of three and one, not one long run of the heavy project.
    runs, previous = [], None
    for queue in served:
        if queue == previous:
            runs[-1] += 1
        else:
            runs.append(1)
        previous = queue
    assert set(runs) == {3, 1} and max(runs) == 3


def test_an_idle_projects_share_goes_to_the_busy_one():
    busy, idle = uuid.uuid4(), uuid.uuid4()
    flow_rules_set(project_id=idle, weight=10, max_in_flight=0)
    for _ in range(12):
        send(tasks.record, project_id=busy)
    holder = Holder(ack=True)
    with shared_channel(holder) as (connection, _channel):
        drain(connection, holder, 12)
    assert [_project_of(m) for m in holder.messages] == [project_queue(busy)] * 12


def test_a_capped_project_never_has_more_in_flight_and_waits_in_its_queue(redis_client):
    capped = uuid.uuid4()
    queue = project_queue(capped)
    flow_rules_set(project_id=capped, weight=1, max_in_flight=2)
    for _ in range(6):
        send(tasks.record, project_id=capped)
    holder = Holder(ack=False)
    with shared_channel(holder) as (connection, _channel):
        drain(connection, holder, 3, timeout=1.5)
        assert len(holder.messages) == 2  # the third waits in the queue, not here
        assert redis_client.llen(queue) == 4
        assert redis_client.zscore(FLOW_PARKED_KEY, queue) is not None
        assert not redis_client.sismember(READY_MEMBERS_KEY, queue)
        mark_active(capped)
        assert sweep_ready(force=True) == 0  # parked on purpose: not "missed"
        assert not redis_client.sismember(READY_MEMBERS_KEY, queue)
        status = flow_status([capped])[str(capped)]
        assert (status.in_flight, status.parked, status.waiting) == (2, True, 4)
        assert status.cap_waits >= 1

        holder.messages[0].ack()  # a slot comes back: the queue is listed again at once
        drain(connection, holder, 3)
        assert len(holder.messages) == 3
        assert redis_client.zcard(slots_key(queue)) == 2
        for message in holder.messages[1:]:
            message.ack()
        drain(connection, holder, 5)
        assert len(holder.messages) == 5
        assert redis_client.zcard(slots_key(queue)) == 2


def test_a_slot_held_by_a_worker_that_stopped_renewing_comes_back_after_its_lease(
    settings, redis_client
):
    settings.AGENTBUS_SLOT_LEASE_SECONDS = 1
    capped = uuid.uuid4()
    flow_rules_set(project_id=capped, weight=1, max_in_flight=1)
    for _ in range(2):
        send(tasks.record, project_id=capped)
    dead = Holder(ack=False)
    with shared_channel(dead) as (connection, _channel):
        drain(connection, dead, 1)
        assert len(dead.messages) == 1
        # The holder neither acknowledges nor renews (a hung or dead worker).
    alive = Holder(ack=True)
    started = time.monotonic()
    with shared_channel(alive) as (connection, _channel):
        drain(connection, alive, 1, timeout=6)
    assert len(alive.messages) == 1
    assert time.monotonic() - started < 4  # within the lease plus a poll


def test_renewing_keeps_a_slot_past_its_lease(settings, redis_client):
    settings.AGENTBUS_SLOT_LEASE_SECONDS = 1
    capped = uuid.uuid4()
    flow_rules_set(project_id=capped, weight=1, max_in_flight=1)
    for _ in range(2):
        send(tasks.record, project_id=capped)
    holder = Holder(ack=False)
    with shared_channel(holder) as (connection, channel):
        drain(connection, holder, 1)
        until = time.monotonic() + 2.5
        while time.monotonic() < until:
            assert channel.renew_slots() == 1
            with contextlib.suppress(TimeoutError):
                connection.drain_events(timeout=0.3)
        assert len(holder.messages) == 1  # the slot stayed held: nothing more taken
        holder.messages[0].ack()
        drain(connection, holder, 2)
        assert len(holder.messages) == 2


def test_interactive_work_goes_first_and_bulk_is_never_starved(settings):
    settings.AGENTBUS_BULK_EVERY = 4
    project_id = uuid.uuid4()
    for _ in range(8):
        send(tasks.record, project_id=project_id, lane="bulk")
    for _ in range(8):
        send(tasks.record, project_id=project_id)
    holder = Holder(ack=True)
    with shared_channel(holder) as (connection, _channel):
        drain(connection, holder, 16)
    lanes = holder.lanes()
    assert len(lanes) == 16
    # Three interactive takes, then one bulk, while interactive work waits.
    assert lanes[:8] == ["interactive"] * 3 + ["bulk"] + ["interactive"] * 3 + ["bulk"]
    assert lanes.count("bulk") == 8


def test_a_bulk_message_put_back_returns_to_the_bulk_lane(redis_client):
    project_id = uuid.uuid4()
    queue = project_queue(project_id)
    send(tasks.record, project_id=project_id, lane="bulk")
    assert redis_client.llen(queue + BULK_SUFFIX) == 1
    holder = Holder(ack=False)
    with shared_channel(holder) as (connection, channel):
        drain(connection, holder, 1)
        assert redis_client.llen(queue + BULK_SUFFIX) == 0
        channel.qos.restore_unacked()
    assert redis_client.llen(queue + BULK_SUFFIX) == 1
    assert redis_client.sismember(READY_MEMBERS_KEY, queue)


def test_an_unknown_lane_is_refused_before_anything_is_sent(redis_client):
    project_id = uuid.uuid4()
    with pytest.raises(ValueError, match="lane"):
        publish(tasks.record, project_id=project_id, kwargs={"user_id": 1}, lane="urgent")
    assert queue_depth(project_id) == 0  # neither lane


def test_rules_out_of_bounds_are_refused():
    with pytest.raises(ValueError):
        flow_rules_set(project_id=uuid.uuid4(), weight=0, max_in_flight=0)
    with pytest.raises(ValueError):
        flow_rules_set(project_id=uuid.uuid4(), weight=2, max_in_flight=-1)


def test_a_dedicated_worker_serves_both_lanes_interactive_first():
    project_id = uuid.uuid4()
    send(tasks.record, project_id=project_id, lane="bulk")
    send(tasks.record, project_id=project_id)
    holder = Holder(ack=True)
    with Connection(
        app.conf.broker_url,
        transport=Transport,
        transport_options=app.conf.broker_transport_options,
    ) as connection:
        consumer = Consumer(
            connection.default_channel,
            queues=[direct_queue(project_queue(project_id))],
            callbacks=[holder],
            accept=["json"],
        )
        consumer.consume()  # its own queue, polled with BRPOP: no ready list
        drain(connection, holder, 2)
        consumer.cancel()
    assert holder.lanes() == ["interactive", "bulk"]
    assert queue_depth(project_id) == 0


def test_the_bulk_mark_comes_with_bulk_work_and_goes_with_it(redis_client):
    # A queue never given bulk work takes no lane turns: the take reads the mark with the
    # rules, and the mark goes once the bulk lane is empty.
    project_id = uuid.uuid4()
    mark = project_queue(project_id) + BULK_SUFFIX
    for _ in range(3):
        send(tasks.record, project_id=project_id)
    assert redis_client.hget(FLOW_RULES_KEY, mark) is None
    send(tasks.record, project_id=project_id, lane="bulk")
    assert redis_client.hget(FLOW_RULES_KEY, mark) == "1"
    holder = Holder(ack=True)
    with shared_channel(holder) as (connection, _channel):
        drain(connection, holder, 4)
    assert sorted(holder.lanes()) == ["bulk"] + ["interactive"] * 3
    assert redis_client.hget(FLOW_RULES_KEY, mark) is None


def test_a_task_class_on_the_bulk_lane_goes_there_unless_publish_is_told(redis_client):
    project_id = uuid.uuid4()
    mark = project_queue(project_id) + BULK_SUFFIX
    send(tasks.record_bulk, project_id=project_id)
    send(tasks.record_bulk, project_id=project_id, lane="interactive")
    assert redis_client.hget(FLOW_RULES_KEY, mark) == "1"
    holder = Holder(ack=True)
    with shared_channel(holder) as (connection, _channel):
        drain(connection, holder, 2)
    assert sorted(holder.lanes()) == ["bulk", "interactive"]


def test_a_parked_queue_comes_back_after_its_lease_while_others_keep_the_pool_busy(
    settings, redis_client
):
    settings.AGENTBUS_SLOT_LEASE_SECONDS = 1
    capped, busy = uuid.uuid4(), uuid.uuid4()
    queue = project_queue(capped)
    flow_rules_set(project_id=capped, weight=1, max_in_flight=1)
    send(tasks.record, project_id=capped)
    for _ in range(100):
        send(tasks.record, project_id=busy)
    # Its one slot is held by a worker that died (nobody renews it).
    redis_client.zadd(slots_key(queue), {"dead-worker-tag": time.time() + 3})

    class Slow(Holder):  # each task takes 60 ms: the busy project fills the pool for 6 s
        def __call__(self, body, message):
            time.sleep(0.06)
            super().__call__(body, message)

    holder = Slow(ack=True)
    with shared_channel(holder) as (connection, _channel):
        drain(connection, holder, 101, timeout=30)
    served = [_project_of(m) for m in holder.messages]
    assert served.count(queue) == 1
    assert flow_status([capped])[str(capped)].cap_waits >= 1  # it was parked
    assert served.index(queue) < 100  # listed again by a take, not when the pool went idle


def test_takes_are_counted_by_the_worker_and_by_the_take_under_bulk_work():
    plain, bulky = uuid.uuid4(), uuid.uuid4()
    flow_rules_set(project_id=plain, weight=2, max_in_flight=3)  # rules: still the worker's
    for _ in range(3):
        send(tasks.record, project_id=plain)
        send(tasks.record, project_id=bulky)
    send(tasks.record, project_id=bulky, lane="bulk")
    holder = Holder(ack=True)
    with shared_channel(holder) as (connection, channel):
        drain(connection, holder, 7)
        status = flow_status([plain, bulky])
        assert (status[str(plain)].served, status[str(bulky)].served) == (0, 4)
        assert status[str(bulky)].served_bulk == 1
        assert channel.flush_served() == 3  # the plain project's, in one pipeline
        assert channel.flush_served() == 0
    status = flow_status([plain, bulky])
    assert (status[str(plain)].served, status[str(bulky)].served) == (3, 4)


def test_a_deleted_projects_takes_are_not_counted_after_its_teardown(redis_client):
    # The worker adds its counts every lease/3: a project deleted meanwhile must not get
    # a counter back after its teardown removed it.
    gone, kept = uuid.uuid4(), uuid.uuid4()
    send(tasks.record, project_id=gone)
    send(tasks.record, project_id=kept)
    holder = Holder(ack=True)
    with shared_channel(holder) as (connection, channel):
        drain(connection, holder, 2)
        project_tombstone(gone)
        assert channel.flush_served() == 2
    assert redis_client.hget(FLOW_STATS_KEY, f"served:{project_queue(gone)}") is None
    assert redis_client.hget(FLOW_STATS_KEY, f"served:{project_queue(kept)}") == "1"


def test_with_flow_control_off_the_rules_are_stored_not_applied(settings, redis_client):
    # AGENTBUS_FLOW_CONTROL off: the plain round robin, one task per project a turn; a
    # weight and a cap stay stored, and nothing is leased or counted.
    settings.AGENTBUS_FLOW_CONTROL = False
    heavy, light = uuid.uuid4(), uuid.uuid4()
    flow_rules_set(project_id=heavy, weight=3, max_in_flight=1)
    for _ in range(6):
        send(tasks.record, project_id=heavy)
        send(tasks.record, project_id=light)
    holder = Holder(ack=False)  # held: a cap of 1 would stop the heavy project at one
    with shared_channel(holder) as (connection, channel):
        drain(connection, holder, 12)
        served = [_project_of(m) for m in holder.messages]
        assert served == [project_queue(heavy), project_queue(light)] * 6
        assert redis_client.zcard(slots_key(project_queue(heavy))) == 0
        assert channel.flush_served() == 0
        status = flow_status([heavy])[str(heavy)]
        assert (status.weight, status.max_in_flight) == (3, 1)
        assert (status.served, status.cap_waits, status.parked) == (0, 0, False)


def test_with_flow_control_off_bulk_work_shares_the_interactive_list(settings, redis_client):
    project_id = uuid.uuid4()
    queue = project_queue(project_id)
    send(tasks.record, project_id=project_id, lane="bulk")  # sent while flow control was on
    settings.AGENTBUS_FLOW_CONTROL = False
    send(tasks.record, project_id=project_id, lane="bulk")
    send(tasks.record, project_id=project_id)
    assert (redis_client.llen(queue), redis_client.llen(queue + BULK_SUFFIX)) == (2, 1)
    holder = Holder(ack=False)
    with shared_channel(holder) as (connection, channel):
        drain(connection, holder, 3, timeout=1.0)
        # In the order sent to the one list. The bulk list left over from before is not
        # looked at by a take that empties the interactive one: the sweep lists it.
        assert holder.lanes() == ["bulk", "interactive"]
        assert sweep_ready(force=True) == 1
        drain(connection, holder, 3)
        assert holder.lanes() == ["bulk", "interactive", "bulk"]
        assert queue_depth(project_id) == 0
        channel.qos.restore_unacked()  # each back on the list it was taken from
    assert (redis_client.llen(queue), redis_client.llen(queue + BULK_SUFFIX)) == (2, 1)
    assert redis_client.sismember(READY_MEMBERS_KEY, queue)


def test_a_queue_parked_when_flow_control_is_turned_off_is_listed_by_the_sweep(
    settings, redis_client
):
    project_id = uuid.uuid4()
    queue = project_queue(project_id)
    flow_rules_set(project_id=project_id, weight=1, max_in_flight=1)
    redis_client.zadd(slots_key(queue), {"dead-worker-tag": time.time() + 60})
    send(tasks.record, project_id=project_id)
    holder = Holder(ack=True)
    with shared_channel(holder) as (connection, _channel):
        drain(connection, holder, 1, timeout=0.5)
    assert holder.messages == [] and redis_client.zscore(FLOW_PARKED_KEY, queue) is not None
    assert sweep_ready(force=True) == 0  # parked on purpose while flow control is on
    settings.AGENTBUS_FLOW_CONTROL = False
    assert sweep_ready(force=True) == 1
    with shared_channel(holder) as (connection, _channel):
        drain(connection, holder, 1)
    assert [_project_of(m) for m in holder.messages] == [queue]


def test_with_flow_control_off_a_deleted_projects_lists_are_purged_and_skipped(
    settings, redis_client
):
    gone, kept = uuid.uuid4(), uuid.uuid4()
    send(tasks.record, project_id=gone)
    send(tasks.record, project_id=gone, lane="bulk")  # sent while flow control was on
    send(tasks.record, project_id=kept)
    settings.AGENTBUS_FLOW_CONTROL = False
    project_tombstone(gone)
    holder = Holder(ack=True)
    with shared_channel(holder) as (connection, _channel):
        drain(connection, holder, 2, timeout=1.0)
    assert [_project_of(m) for m in holder.messages] == [project_queue(kept)]
    queue = project_queue(gone)
    assert not redis_client.exists(queue, queue + BULK_SUFFIX)
    assert not redis_client.sismember(READY_MEMBERS_KEY, queue)
