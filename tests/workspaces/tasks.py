"""An agent task for the workspace tests: records that it ran, so a test can show that
no task of a deleted project runs."""

from __future__ import annotations

from celery import shared_task

from agentbus import AgentBusTask
from common.redis import get_redis

RAN_KEY = "uws:test:workspaces:ran"


@shared_task(base=AgentBusTask, bind=True, name="tests.workspaces.record")
def record(self, *, user_id: int, project_id: str) -> None:
    get_redis().rpush(RAN_KEY, project_id)


def ran(project_id) -> int:
    return get_redis().lrange(RAN_KEY, 0, -1).count(str(project_id))
