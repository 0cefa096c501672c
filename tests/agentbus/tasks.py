"""Agent tasks used only by the AgentBus tests (also imported by worker subprocesses
started with `-I tests.agentbus.tasks`).

They record what happened in Redis under `uws:test:`, which the suite wipes between
tests: each start, and the effect keyed by task id so a run repeated after a crash
counts once.
"""

from __future__ import annotations

import json
import os
import time

from celery import shared_task

from agentbus import AgentBusTask
from common.redis import get_redis

PREFIX = "uws:test:"


def started_key(tag: str) -> str:
    return f"{PREFIX}started:{tag}"


def effects_key(tag: str) -> str:
    return f"{PREFIX}effects:{tag}"


def attempts_key(task_id: str) -> str:
    return f"{PREFIX}attempts:{task_id}"


@shared_task(base=AgentBusTask, bind=True, name="tests.agentbus.record")
def record(
    self,
    *,
    user_id: int,
    project_id: str,
    tag: str = "",
    sleep: float = 0.0,
    sleep_first_attempt: float = 0.0,
) -> None:
    """Note the start, optionally sleep, then apply the effect once per task id."""
    attempt = _note_start(self, tag, user_id=user_id, project_id=project_id)
    time.sleep(sleep + (sleep_first_attempt if attempt == 1 else 0.0))
    _apply_effect(self, tag)


@shared_task(base=AgentBusTask, bind=True, name="tests.agentbus.record_bulk", lane="bulk")
def record_bulk(self, *, user_id: int, project_id: str, tag: str = "") -> None:
    """`record` on the bulk lane, by its class (publish is not told the lane)."""
    _note_start(self, tag, user_id=user_id, project_id=project_id)
    _apply_effect(self, tag)


@shared_task(base=AgentBusTask, bind=True, name="tests.agentbus.flaky", max_retries=3)
def flaky(self, *, user_id: int, project_id: str, tag: str = "") -> None:
    """Fails its first attempt and asks Celery to retry it."""
    if _note_start(self, tag, user_id=user_id, project_id=project_id) == 1:
        raise self.retry(countdown=0.1)
    _apply_effect(self, tag)


def _note_start(task, tag: str, **ids) -> int:
    client = get_redis()
    attempt = client.incr(attempts_key(task.request.id))
    entry = {
        "id": task.request.id,
        "pid": os.getpid(),
        "at": time.time(),
        "attempt": attempt,
        "routing_key": (task.request.delivery_info or {}).get("routing_key"),
        **ids,
    }
    client.rpush(started_key(tag), json.dumps(entry))
    return attempt


def _apply_effect(task, tag: str) -> None:
    # Idempotent, keyed by task id: a repeated run changes nothing.
    if get_redis().set(f"{PREFIX}effect:{task.request.id}", "1", nx=True):
        get_redis().rpush(effects_key(tag), task.request.id)


def started(tag: str) -> list[dict]:
    return [json.loads(x) for x in get_redis().lrange(started_key(tag), 0, -1)]


def effects(tag: str) -> list[str]:
    return get_redis().lrange(effects_key(tag), 0, -1)


# Raise a project's peak of tasks running at once. KEYS: running, peak.
_RUNNING = """
local n = redis.call('INCR', KEYS[1])
if n > tonumber(redis.call('GET', KEYS[2]) or '0') then redis.call('SET', KEYS[2], n) end
return n
"""


def running_peak(project_id: str) -> int:
    return int(get_redis().get(f"{PREFIX}peak:{project_id}") or 0)


@shared_task(base=AgentBusTask, bind=True, name="tests.agentbus.occupy")
def occupy(self, *, user_id: int, project_id: str, tag: str = "", sleep: float = 0.0) -> None:
    """Counts itself among its project's running tasks (the peak is kept) while it sleeps."""
    client = get_redis()
    running = f"{PREFIX}running:{project_id}"
    client.eval(_RUNNING, 2, running, f"{PREFIX}peak:{project_id}")
    _note_start(self, tag, user_id=user_id, project_id=project_id)
    try:
        time.sleep(sleep)
    finally:
        client.decr(running)
    _apply_effect(self, tag)
