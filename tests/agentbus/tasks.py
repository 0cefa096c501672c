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

from workspaces.bus import AgentBusTask
from workspaces.redis import get_redis

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
    client = get_redis()
    attempt = client.incr(attempts_key(self.request.id))
    client.rpush(
        started_key(tag),
        json.dumps(
            {
                "id": self.request.id,
                "pid": os.getpid(),
                "at": time.time(),
                "attempt": attempt,
                "user_id": user_id,
                "project_id": project_id,
            }
        ),
    )
    time.sleep(sleep + (sleep_first_attempt if attempt == 1 else 0.0))
    # The effect: idempotent, keyed by task id.
    if client.set(f"{PREFIX}effect:{self.request.id}", "1", nx=True):
        client.rpush(effects_key(tag), self.request.id)


def started(tag: str) -> list[dict]:
    return [json.loads(x) for x in get_redis().lrange(started_key(tag), 0, -1)]


def effects(tag: str) -> list[str]:
    return get_redis().lrange(effects_key(tag), 0, -1)
