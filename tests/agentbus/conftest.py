"""Helpers for the AgentBus tests: a clean broker per test, and publishing test tasks."""

from __future__ import annotations

import uuid

import pytest
from kombu import Connection

from agentbus import publish
from agentbus.broker import AMQP_QUEUES_KEY, amqp_known_queues
from common.redis import broker_redis
from config.celery_app import app
from tests.rabbitmq import amqp_unavailable, amqp_vhost
from tests.workers import ROOT, broker_at, wait_for, worker_status

__all__ = ["ROOT", "send", "wait_for", "worker_status"]  # what the tests import from here


@pytest.fixture(autouse=True)
def _clean_broker_state(_clean_workspace_keys):
    """Each test starts with empty queues and nothing in kombu's `unacked` (the suite
    already wipes the `uws:` keys, the active set and tombstones among them)."""
    client = broker_redis()
    keys = [*client.scan_iter(match="uws.*", count=1000), "unacked", "unacked_index"]
    client.unlink(*keys)
    yield


def send(task, *, user_id: int = 1, project_id, kwargs: dict | None = None, **options) -> str:
    """Publish a test task on the project's queue; returns the task id."""
    payload = {"user_id": user_id, **(kwargs or {})}
    return publish(task, project_id=project_id, kwargs=payload, **options).id


@pytest.fixture
def project_id() -> uuid.UUID:
    return uuid.uuid4()


# --- the broker: Redis, or RabbitMQ (a module runs on both with `usefixtures("bus_broker")`)


def pytest_generate_tests(metafunc):
    chosen = any(
        "bus_broker" in str(mark.args[0])
        for mark in metafunc.definition.iter_markers("parametrize")
    )
    if "bus_broker" in metafunc.fixturenames and not chosen:
        metafunc.parametrize("bus_broker", ["redis", "amqp"], indirect=True)


@pytest.fixture(scope="session")
def _amqp_url():
    """A RabbitMQ vhost for this test run (tests.rabbitmq), or the reason there is none."""
    reason = amqp_unavailable()
    if reason:
        yield None, reason
        return
    with amqp_vhost() as url:
        yield url, None


@pytest.fixture
def bus_broker(request, settings):
    """The broker this test runs on: the suite's Redis, or RabbitMQ (skipped, with the
    reason, where none answers). On RabbitMQ the bus's coordination state stays in the
    suite's Redis (REDIS_URL)."""
    if request.param == "redis":
        yield "redis"
        return
    url, reason = request.getfixturevalue("_amqp_url")
    if url is None:
        pytest.skip(reason)

    # broker_at first: it remembers the app's broker URL, which reads the settings'.
    with broker_at(url):
        settings.CELERY_BROKER_URL = url
        yield "amqp"
        # What a test left on the vhost does not meet the next one. Deleted on one
        # channel without waiting for each answer (amqp_delete takes a connection and a
        # channel per queue: seconds for a test that declared a thousand); deleting a
        # missing queue is no error. The broker may take longer than the app's bound on a
        # reply (AMQP_TIMEOUT_SECONDS) to answer after a thousand deletes on a busy machine.
        queues = amqp_known_queues()
        if queues:
            patient = {"read_timeout": 120, "write_timeout": 120}
            with Connection(url, transport_options=patient) as conn:
                channel = conn.channel()
                for queue in queues:
                    channel.queue_delete(queue=queue, nowait=True)
                channel.close()  # answered once the broker has done the deletes sent before
            broker_redis().srem(AMQP_QUEUES_KEY, *queues)
    app.amqp.__dict__.pop("queues", None)
