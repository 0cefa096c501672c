"""The AgentBus against real Redis, without a worker: naming and routing, the active
set, tombstones, retirement, the reaper and the rescue of stranded queues."""

from __future__ import annotations

import base64
import json
import time
import uuid

import pytest
import redis
from django.core.exceptions import ImproperlyConfigured
from kombu import Connection, Consumer

from agentbus import active, publish
from agentbus.active import _RETIRE_IDLE, ACTIVE_KEY, RETIRED_KEY
from agentbus.guard import TOMBSTONE_PREFIX, ProjectGone, project_gone, project_tombstone
from agentbus.queues import (
    MAINTENANCE_QUEUE,
    direct_queue,
    is_project_queue,
    project_id_from_queue,
    project_queue,
)
from agentbus.tasks import reap_idle_queues
from agentbus.worker import check_visibility_timeout
from common.redis import close_redis
from config.celery_app import app
from tests.agentbus import tasks
from tests.agentbus.conftest import send
from workspaces.redis import scoped, workspace_prefix

# Tests of what does not depend on the broker run on Redis and on RabbitMQ.
ON_BOTH_BROKERS = pytest.mark.usefixtures("bus_broker")


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


def test_publish_writes_one_list_and_no_bindings(project_id, redis_client):
    task_id = send(tasks.record, user_id=7, project_id=project_id, kwargs={"tag": "x"})

    queue = project_queue(project_id)
    [message] = queued_messages(redis_client, queue)
    assert message["headers"]["id"] == task_id
    assert message["headers"]["task"] == "tests.agentbus.record"
    info = message["properties"]["delivery_info"]
    assert info == {"exchange": "", "routing_key": queue}
    _args, kwargs, _embed = json.loads(base64.b64decode(message["body"]))
    assert kwargs == {"tag": "x", "user_id": 7, "project_id": str(project_id)}
    assert project_routing_entries(redis_client) == []
    assert active.queue_depth(project_id) == 1


def test_consuming_a_project_queue_declares_nothing(redis_client):
    queue = direct_queue(project_queue(uuid.uuid4()))
    with Connection(app.conf.broker_url) as conn:
        consumer = Consumer(conn.default_channel, queues=[queue], callbacks=[])
        consumer.consume()
        consumer.cancel()
    assert project_routing_entries(redis_client) == []


def test_delay_goes_through_the_bus(project_id, redis_client):
    result = tasks.record.delay(user_id=3, project_id=project_id, tag="d")
    [message] = queued_messages(redis_client, project_queue(project_id))
    assert message["headers"]["id"] == result.id
    assert project_queue(project_id) in active.active_queues()
    assert redis_client.llen(MAINTENANCE_QUEUE) == 0


def test_agent_tasks_refuse_bad_calls(project_id, redis_client):
    with pytest.raises(TypeError):
        tasks.record.delay(3, project_id)  # positional
    with pytest.raises(TypeError):
        tasks.record.delay(user_id=3)  # no project_id
    with pytest.raises(TypeError):
        publish(reap_idle_queues, project_id=project_id)
    with pytest.raises(ValueError):
        send(tasks.record, user_id=1, project_id="nope")
    assert redis_client.llen(project_queue(project_id)) == 0
    assert active.active_queues() == []


# --- active set -----------------------------------------------------------------------


@ON_BOTH_BROKERS
def test_mark_active_before_publish_and_refresh(project_id, redis_client):
    assert active.mark_active(project_id) == 1
    first = redis_client.zscore(ACTIVE_KEY, project_queue(project_id))
    time.sleep(0.01)
    assert active.mark_active(project_id) == 0
    assert redis_client.zscore(ACTIVE_KEY, project_queue(project_id)) > first
    assert active.active_queues() == [project_queue(project_id)]


@ON_BOTH_BROKERS
def test_active_among():
    a, b = uuid.uuid4(), uuid.uuid4()
    active.mark_active(a)
    assert active.active_among([project_queue(a), project_queue(b)]) == {project_queue(a)}
    assert active.active_among([]) == set()


# --- tombstones and retirement ------------------------------------------------------------


def test_tombstone_is_global_and_survives_workspace_wipe(project_id, redis_client):
    project_tombstone(project_id)
    key = TOMBSTONE_PREFIX + project_id.hex
    assert not key.startswith(workspace_prefix(1, project_id))
    assert redis_client.ttl(key) > 86400
    scoped(1, project_id).delete_all()
    assert project_gone(project_id)
    assert not project_gone(uuid.uuid4())


@ON_BOTH_BROKERS
def test_publishing_to_a_tombstoned_project_sends_nothing(project_id, redis_client):
    project_tombstone(project_id)
    with pytest.raises(ProjectGone):
        send(tasks.record, user_id=1, project_id=project_id)
    assert active.queue_depth(project_id) == 0
    assert active.active_queues() == []


@ON_BOTH_BROKERS
def test_retire_project_purges_and_leaves_the_active_set(redis_client):
    gone, kept = uuid.uuid4(), uuid.uuid4()
    for _ in range(5):
        send(tasks.record, user_id=1, project_id=gone)
    send(tasks.record, user_id=1, project_id=kept)

    assert active.retire_project(gone) == 5
    assert active.queue_depth(gone) == 0
    assert active.active_queues() == [project_queue(kept)]
    assert active.queue_depth(kept) == 1
    # Idempotent.
    assert active.retire_project(gone) == 0


def test_retire_project_raises_when_redis_is_down(project_id, settings):
    send(tasks.record, user_id=1, project_id=project_id)
    close_redis()
    settings.REDIS_URL = settings.CELERY_BROKER_URL = "redis://127.0.0.1:1/0"
    try:
        with pytest.raises(redis.ConnectionError):
            active.retire_project(project_id)
    finally:
        close_redis()


# --- the reaper ------------------------------------------------------------------------


def _age(redis_client, queue: str, seconds: float) -> None:
    redis_client.zadd(ACTIVE_KEY, {queue: time.time() - seconds})


def test_reaper_retires_only_idle_empty_queues(redis_client):
    idle, busy, recent, running = (uuid.uuid4() for _ in range(4))
    for project in (idle, recent, running):
        active.mark_active(project)
    send(tasks.record, user_id=1, project_id=busy)
    for project in (idle, busy, running):
        _age(redis_client, project_queue(project), 100)
    # A message of `running` is with a worker: kombu holds it in `unacked`.
    redis_client.hset("unacked", "tag-1", json.dumps([{"body": ""}, "", project_queue(running)]))

    retired = active.reap_idle_queues(idle_seconds=50)

    assert retired == [project_queue(idle)]
    assert set(active.active_queues()) == {project_queue(p) for p in (busy, recent, running)}


@ON_BOTH_BROKERS
def test_reaper_walks_past_its_batch_size(redis_client):
    projects = [uuid.uuid4() for _ in range(25)]
    for project in projects:
        active.mark_active(project)
        _age(redis_client, project_queue(project), 100)
    send(tasks.record, user_id=1, project_id=projects[3])
    _age(redis_client, project_queue(projects[3]), 100)

    retired = active.reap_idle_queues(idle_seconds=50, batch=4)

    assert len(retired) == 24
    assert active.active_queues() == [project_queue(projects[3])]


def test_reaper_stops_at_its_budget_and_the_next_run_goes_on(redis_client, settings):
    projects = [uuid.uuid4() for _ in range(10)]
    for project in projects:
        active.mark_active(project)
        _age(redis_client, project_queue(project), 100)
    settings.AGENTBUS_REAP_BUDGET_SECONDS = 0  # spent at once: one batch a run
    assert len(active.reap_idle_queues(idle_seconds=50, batch=4)) == 4
    assert len(active.active_queues()) == 6
    assert len(active.reap_idle_queues(idle_seconds=50, batch=4)) == 4
    settings.AGENTBUS_REAP_BUDGET_SECONDS = 60
    assert len(active.reap_idle_queues(idle_seconds=50, batch=4)) == 2
    assert active.active_queues() == []


@ON_BOTH_BROKERS
def test_a_publish_after_retirement_reactivates(project_id, redis_client):
    active.mark_active(project_id)
    _age(redis_client, project_queue(project_id), 100)
    assert active.reap_idle_queues(idle_seconds=50) == [project_queue(project_id)]
    # The producer finds the queue inactive again, so it is re-added (and announced).
    assert active.mark_active(project_id) == 1
    assert active.active_queues() == [project_queue(project_id)]


def test_retire_script_rechecks_length(project_id, redis_client):
    """The reaper lists candidates, then a message lands, then the script runs: the
    script's own LLEN keeps the queue."""
    queue = project_queue(project_id)
    active.mark_active(project_id)
    _age(redis_client, queue, 100)
    redis_client.lpush(queue, "{}")
    script = redis_client.register_script(_RETIRE_IDLE)
    keys = [ACTIVE_KEY, RETIRED_KEY, queue]
    assert script(keys=keys, args=[time.time() - 50, 1, time.time(), queue]) == []
    assert active.active_queues() == [queue]


@ON_BOTH_BROKERS
def test_rescue_finds_messages_put_back_into_retired_queues(redis_client):
    crashed, deleted, quiet = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    for project in (crashed, deleted, quiet):
        active.mark_active(project)
        _age(redis_client, project_queue(project), 100)
    assert len(active.reap_idle_queues(idle_seconds=50)) == 3
    # A worker that held a message of each of two queues died; kombu put them back.
    for project in (crashed, deleted):
        send(tasks.record, user_id=1, project_id=project)
        redis_client.zrem(ACTIVE_KEY, project_queue(project))
    project_tombstone(deleted)

    rescued = active.rescue_stranded_queues(full_scan=False)

    assert rescued == [project_queue(crashed)]
    assert active.active_queues() == [project_queue(crashed)]
    assert active.queue_depth(crashed) == 1
    assert active.queue_depth(deleted) == 0
    assert set(redis_client.zrange(RETIRED_KEY, 0, -1)) == {
        project_queue(deleted),
        project_queue(quiet),
    }


@ON_BOTH_BROKERS
def test_a_full_scan_finds_queues_the_active_set_lost_at_most_so_often(redis_client):
    first, second = uuid.uuid4(), uuid.uuid4()
    send(tasks.record, user_id=1, project_id=first)
    redis_client.delete(ACTIVE_KEY)  # the active set is lost

    assert active.rescue_stranded_queues() == [project_queue(first)]  # the scan was due

    send(tasks.record, user_id=1, project_id=second)
    redis_client.delete(ACTIVE_KEY)
    assert active.rescue_stranded_queues() == []  # not due yet
    assert active.rescue_stranded_queues(full_scan=True) == sorted(
        [project_queue(first), project_queue(second)]
    )


def test_a_worker_refuses_a_visibility_timeout_shorter_than_the_longest_task(settings):
    check_visibility_timeout()  # the settings as they are: 3600 s > 600 s
    settings.CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": 300}
    with pytest.raises(ImproperlyConfigured, match="visibility_timeout"):
        check_visibility_timeout()
    # The thread pool ignores CELERY_TASK_TIME_LIMIT: a run lasts its own limit, plus
    # the soft-shutdown window.
    settings.CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": 3600}
    settings.RUN_TIME_LIMIT_SECONDS, settings.CELERY_WORKER_SOFT_SHUTDOWN_TIMEOUT = 3590, 30
    with pytest.raises(ImproperlyConfigured, match="RUN_TIME_LIMIT_SECONDS"):
        check_visibility_timeout()
