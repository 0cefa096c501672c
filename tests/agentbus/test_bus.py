"""The AgentBus against real Redis, without a worker: naming and routing, the active
set, tombstones, retirement, the reaper and the rescue of stranded queues."""

from __future__ import annotations

import base64
import json
import time
import uuid

import pytest
import redis
from kombu import Connection, Consumer

from config.celery_app import app
from tests.agentbus import tasks
from workspaces.bus import ACTIVE_KEY, RETIRED_KEY, TOMBSTONE_PREFIX, AgentBus
from workspaces.bus_tasks import reap_idle_queues
from workspaces.queues import (
    MAINTENANCE_QUEUE,
    direct_queue,
    is_project_queue,
    project_id_from_queue,
    project_queue,
)
from workspaces.redis import close_redis, scoped, workspace_prefix


def queued_messages(client, queue: str) -> list[dict]:
    return [json.loads(raw) for raw in client.lrange(queue, 0, -1)]


def project_routing_entries(client) -> list[str]:
    """Every routing key or binding-table entry that names a project queue (kombu keeps
    bindings in `_kombu.binding.<exchange>` sets)."""
    found = [k for k in client.scan_iter(match="*", count=1000) if "uws.project." in k]
    found = [k for k in found if client.type(k) != "list"]  # the queues themselves
    for key in client.scan_iter(match="_kombu.binding*", count=1000):
        if client.type(key) == "set":
            found += [m for m in client.smembers(key) if "uws.project." in m]
        elif client.type(key) == "zset":
            found += [m for m in client.zrange(key, 0, -1) if "uws.project." in m]
    return found


# --- names and routing ----------------------------------------------------------------


def test_project_queue_names_round_trip():
    project_id = uuid.uuid4()
    queue = project_queue(project_id)
    assert queue == f"uws.project.{project_id.hex}"
    assert project_queue(str(project_id)) == queue
    assert project_id_from_queue(queue) == project_id
    assert is_project_queue(queue)
    assert not is_project_queue(MAINTENANCE_QUEUE)
    assert project_id_from_queue("uws.project.not-a-uuid") is None
    with pytest.raises(ValueError):
        project_queue("not-a-uuid")


def test_unknown_queues_stay_on_the_nameless_exchange():
    queues = app.amqp.Queues([])
    project = project_queue(uuid.uuid4())
    missing = queues[project]  # what `-Q <queue>` and task_create_missing_queues do
    assert missing.exchange.name == "" and missing.routing_key == project
    # What Celery's own `add_consumer` asks for: an exchange named after the queue.
    other = project_queue(uuid.uuid4())
    added = queues.select_add(other, exchange=other, exchange_type="direct", routing_key=None)
    assert added.exchange.name == "" and added.routing_key == other


def test_publish_writes_one_list_and_no_bindings(bus, project_id, redis_client):
    task_id = bus.publish(tasks.record, user_id=7, project_id=project_id, kwargs={"tag": "x"})

    queue = project_queue(project_id)
    [message] = queued_messages(redis_client, queue)
    assert message["headers"]["id"] == task_id
    assert message["headers"]["task"] == "tests.agentbus.record"
    info = message["properties"]["delivery_info"]
    assert info == {"exchange": "", "routing_key": queue}
    _args, kwargs, _embed = json.loads(base64.b64decode(message["body"]))
    assert kwargs == {"tag": "x", "user_id": 7, "project_id": str(project_id)}
    assert project_routing_entries(redis_client) == []
    assert bus.queue_depth(project_id) == 1


def test_consuming_a_project_queue_declares_nothing(redis_client):
    queue = direct_queue(project_queue(uuid.uuid4()))
    with Connection(app.conf.broker_url) as conn:
        consumer = Consumer(conn.default_channel, queues=[queue], callbacks=[])
        consumer.consume()
        consumer.cancel()
    assert project_routing_entries(redis_client) == []


def test_delay_goes_through_the_bus(bus, project_id, redis_client):
    result = tasks.record.delay(user_id=3, project_id=project_id, tag="d")
    [message] = queued_messages(redis_client, project_queue(project_id))
    assert message["headers"]["id"] == result.id
    assert project_queue(project_id) in bus.active_queues()
    assert redis_client.llen(MAINTENANCE_QUEUE) == 0


def test_agent_tasks_refuse_bad_calls(bus, project_id, redis_client):
    with pytest.raises(TypeError):
        tasks.record.delay(3, project_id)  # positional
    with pytest.raises(TypeError):
        tasks.record.delay(project_id=project_id)  # no user_id
    with pytest.raises(TypeError):
        bus.publish(reap_idle_queues, user_id=1, project_id=project_id)
    with pytest.raises(ValueError):
        bus.publish(tasks.record, user_id=1, project_id="nope")
    assert redis_client.llen(project_queue(project_id)) == 0
    assert bus.active_queues() == []


# --- active set -----------------------------------------------------------------------


def test_mark_active_before_publish_and_refresh(bus, project_id, redis_client):
    assert bus.mark_active(project_id) == 1
    first = redis_client.zscore(ACTIVE_KEY, project_queue(project_id))
    time.sleep(0.01)
    assert bus.mark_active(project_id) == 0
    assert redis_client.zscore(ACTIVE_KEY, project_queue(project_id)) > first
    assert bus.active_queues() == [project_queue(project_id)]


def test_active_among(bus):
    a, b = uuid.uuid4(), uuid.uuid4()
    bus.mark_active(a)
    assert bus.active_among([project_queue(a), project_queue(b)]) == {project_queue(a)}
    assert bus.active_among([]) == set()


# --- registered agents ------------------------------------------------------------------


def test_registered_agents_live_under_the_workspace_prefix(bus, redis_client):
    p1, p2 = uuid.uuid4(), uuid.uuid4()
    bus.register_agent(user_id=1, project_id=p1, agent_id="a")
    bus.register_agent(user_id=1, project_id=p1, agent_id="b")
    bus.register_agent(user_id=2, project_id=p2, agent_id="c")
    bus.deregister_agent(user_id=1, project_id=p1, agent_id="b")
    assert bus.registered_agents(user_id=1, project_id=p1) == {"a"}
    assert bus.registered_agents(user_id=2, project_id=p2) == {"c"}
    assert bus.registered_agents(user_id=2, project_id=p1) == set()
    keys = set(redis_client.scan_iter(match="uws:*"))
    assert keys == {workspace_prefix(1, p1) + "bus:agents", workspace_prefix(2, p2) + "bus:agents"}


# --- tombstones and retirement ------------------------------------------------------------


def test_tombstone_is_global_and_survives_workspace_wipe(bus, project_id, redis_client):
    bus.register_agent(user_id=1, project_id=project_id, agent_id="a")
    bus.tombstone_project(project_id)
    key = TOMBSTONE_PREFIX + project_id.hex
    assert not key.startswith(workspace_prefix(1, project_id))
    assert redis_client.ttl(key) > 86400
    scoped(1, project_id).delete_all()
    assert bus.is_tombstoned(project_id)
    assert not bus.is_tombstoned(uuid.uuid4())


def test_publishing_to_a_tombstoned_project_sends_nothing(bus, project_id, redis_client):
    bus.tombstone_project(project_id)
    task_id = bus.publish(tasks.record, user_id=1, project_id=project_id)
    assert uuid.UUID(task_id)
    assert redis_client.llen(project_queue(project_id)) == 0
    assert bus.active_queues() == []


def test_retire_project_purges_and_leaves_the_active_set(bus, redis_client):
    gone, kept = uuid.uuid4(), uuid.uuid4()
    for _ in range(5):
        bus.publish(tasks.record, user_id=1, project_id=gone)
    bus.publish(tasks.record, user_id=1, project_id=kept)
    bus.register_agent(user_id=1, project_id=gone, agent_id="a")

    assert bus.retire_project(user_id=1, project_id=gone) == 5
    assert bus.queue_depth(gone) == 0
    assert bus.active_queues() == [project_queue(kept)]
    assert bus.registered_agents(user_id=1, project_id=gone) == set()
    assert bus.queue_depth(kept) == 1
    # Idempotent.
    assert bus.retire_project(user_id=1, project_id=gone) == 0


def test_retire_project_raises_when_redis_is_down(bus, project_id, settings):
    bus.publish(tasks.record, user_id=1, project_id=project_id)
    close_redis()
    settings.REDIS_URL = settings.CELERY_BROKER_URL = "redis://127.0.0.1:1/0"
    try:
        with pytest.raises(redis.ConnectionError):
            AgentBus().retire_project(user_id=1, project_id=project_id)
    finally:
        close_redis()


# --- the reaper ------------------------------------------------------------------------


def _age(redis_client, queue: str, seconds: float) -> None:
    redis_client.zadd(ACTIVE_KEY, {queue: time.time() - seconds})


def test_reaper_retires_only_idle_empty_queues(bus, redis_client):
    idle, busy, recent, running = (uuid.uuid4() for _ in range(4))
    for project in (idle, recent, running):
        bus.mark_active(project)
    bus.publish(tasks.record, user_id=1, project_id=busy)
    for project in (idle, busy, running):
        _age(redis_client, project_queue(project), 100)
    # A message of `running` is with a worker: kombu holds it in `unacked`.
    redis_client.hset("unacked", "tag-1", json.dumps([{"body": ""}, "", project_queue(running)]))

    retired = bus.reap_idle_queues(idle_seconds=50)

    assert retired == [project_queue(idle)]
    assert set(bus.active_queues()) == {project_queue(p) for p in (busy, recent, running)}


def test_reaper_walks_past_its_batch_size(bus, redis_client):
    projects = [uuid.uuid4() for _ in range(25)]
    for project in projects:
        bus.mark_active(project)
        _age(redis_client, project_queue(project), 100)
    bus.publish(tasks.record, user_id=1, project_id=projects[3])
    _age(redis_client, project_queue(projects[3]), 100)

    retired = bus.reap_idle_queues(idle_seconds=50, batch=4)

    assert len(retired) == 24
    assert bus.active_queues() == [project_queue(projects[3])]


def test_a_publish_after_retirement_reactivates(bus, project_id, redis_client):
    bus.mark_active(project_id)
    _age(redis_client, project_queue(project_id), 100)
    assert bus.reap_idle_queues(idle_seconds=50) == [project_queue(project_id)]
    # The producer finds the queue inactive again, so it is re-added (and announced).
    assert bus.mark_active(project_id) == 1
    assert bus.active_queues() == [project_queue(project_id)]


def test_retire_script_rechecks_length(bus, project_id, redis_client):
    """The reaper lists candidates, then a message lands, then the script runs: the
    script's own LLEN keeps the queue."""
    from workspaces.bus import _RETIRE_IDLE

    queue = project_queue(project_id)
    bus.mark_active(project_id)
    _age(redis_client, queue, 100)
    redis_client.lpush(queue, "{}")
    script = bus._script(_RETIRE_IDLE)
    keys = [ACTIVE_KEY, RETIRED_KEY, queue]
    assert script(keys=keys, args=[time.time() - 50, 1, time.time(), queue]) == []
    assert bus.active_queues() == [queue]


def test_rescue_finds_messages_put_back_into_retired_queues(bus, redis_client):
    crashed, deleted, quiet = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    for project in (crashed, deleted, quiet):
        bus.mark_active(project)
        _age(redis_client, project_queue(project), 100)
    assert len(bus.reap_idle_queues(idle_seconds=50)) == 3
    # A worker that held a message of each of two queues died; kombu put them back.
    for project in (crashed, deleted):
        bus.publish(tasks.record, user_id=1, project_id=project)
        redis_client.zrem(ACTIVE_KEY, project_queue(project))
    bus.tombstone_project(deleted)

    rescued = bus.rescue_stranded_queues(full_scan=False)

    assert rescued == [project_queue(crashed)]
    assert bus.active_queues() == [project_queue(crashed)]
    assert bus.queue_depth(crashed) == 1
    assert bus.queue_depth(deleted) == 0
    assert set(redis_client.zrange(RETIRED_KEY, 0, -1)) == {
        project_queue(deleted),
        project_queue(quiet),
    }


def test_a_full_scan_finds_queues_the_active_set_lost_at_most_so_often(bus, redis_client):
    first, second = uuid.uuid4(), uuid.uuid4()
    bus.publish(tasks.record, user_id=1, project_id=first)
    redis_client.delete(ACTIVE_KEY)  # the active set is lost

    assert bus.rescue_stranded_queues() == [project_queue(first)]  # the scan was due

    bus.publish(tasks.record, user_id=1, project_id=second)
    redis_client.delete(ACTIVE_KEY)
    assert bus.rescue_stranded_queues() == []  # not due yet
    assert bus.rescue_stranded_queues(full_scan=True) == sorted(
        [project_queue(first), project_queue(second)]
    )


def test_a_worker_refuses_a_visibility_timeout_shorter_than_the_longest_task(settings):
    from django.core.exceptions import ImproperlyConfigured

    from workspaces.worker import _check_visibility_timeout

    _check_visibility_timeout()  # the settings as they are: 3600 s > 600 s
    settings.CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": 300}
    with pytest.raises(ImproperlyConfigured, match="visibility_timeout"):
        _check_visibility_timeout()
