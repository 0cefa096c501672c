"""A plain publish (every chat message a web process accepts) skips apply_async once the
process has seen the bus's channel, and pushes exactly the message apply_async would:
a real worker runs it."""

from __future__ import annotations

import importlib
import json

import pytest
from celery import Task
from opentelemetry import trace

from agentbus.queues import project_queue
from common import tracing
from tests.agentbus import tasks
from tests.agentbus.conftest import send, wait_for

# The module, not the `publish` function the package exports under the same name.
bus_publish = importlib.import_module("agentbus.publish")


@pytest.fixture
def apply_async_calls(monkeypatch) -> list[str]:
    """The task ids sent through Celery's apply_async (which still sends them)."""
    calls: list[str] = []
    original = Task.apply_async

    def counted(self, *args, **kwargs):
        calls.append(kwargs.get("task_id"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Task, "apply_async", counted)
    return calls


def _comparable(raw: str) -> dict:
    """A queued message without what differs between any two sends of one task id."""
    message = json.loads(raw)
    del message["headers"]["uws_published_at"]
    del message["properties"]["delivery_tag"]
    return message


@pytest.mark.parametrize("task", [tasks.record, tasks.record_bulk], ids=["interactive", "bulk"])
def test_the_direct_message_is_apply_asyncs(task, project_id, redis_client, apply_async_calls):
    bus_publish._direct.clear()  # learnt again from this first send, through apply_async
    send(task, project_id=project_id, kwargs={"tag": "t"}, task_id="same-id")
    send(task, project_id=project_id, kwargs={"tag": "t"}, task_id="same-id")
    assert apply_async_calls == ["same-id"]  # the second one went direct
    queue = project_queue(project_id) + (":bulk" if task is tasks.record_bulk else "")
    first, second = (_comparable(raw) for raw in reversed(redis_client.lrange(queue, 0, -1)))
    assert second == first


def test_a_send_with_options_goes_through_apply_async(project_id, apply_async_calls):
    send(tasks.record, project_id=project_id, kwargs={"tag": "learn"})
    apply_async_calls.clear()
    later = send(tasks.record, project_id=project_id, kwargs={"tag": "later"}, countdown=5)
    assert apply_async_calls == [later]


@pytest.mark.slow
def test_a_worker_runs_what_was_sent_direct(project_id, live_worker, apply_async_calls):
    sent = [send(tasks.record, project_id=project_id, kwargs={"tag": "w"}) for _ in range(3)]
    assert len(apply_async_calls) <= 1  # at most the first, which learns the channel
    assert wait_for(lambda: sorted(tasks.effects("w")) == sorted(sent), timeout=15)


def test_a_traced_process_keeps_apply_async(project_id, apply_async_calls, monkeypatch):
    """Celery's instrumentation traces a send from apply_async's signals (the worker's
    task span is that span's child)."""
    send(tasks.record, project_id=project_id, kwargs={"tag": "learn"})
    monkeypatch.setattr(tracing, "_enabled", True)  # no exporter: the API's own tracer
    monkeypatch.setattr(tracing, "_tracer", trace.get_tracer("tests"))
    apply_async_calls.clear()
    traced = send(tasks.record, project_id=project_id, kwargs={"tag": "traced"})
    assert apply_async_calls == [traced]
