"""Helpers for the AgentBus tests: a clean broker per test, and publishing test tasks."""

from __future__ import annotations

import uuid

import pytest

from agentbus import publish
from common.redis import broker_redis
from tests.workers import ROOT, wait_for, worker_status

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
