import time
import uuid

import pytest

from tests.agentbus import tasks
from workspaces.bus import get_agent_bus


def wait_for(predicate, timeout=10.0, interval=0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


@pytest.mark.slow
def test_publish_runs_on_live_worker(live_worker, redis_client):
    project_id = uuid.uuid4()
    task_id = get_agent_bus().publish(
        tasks.record, user_id=1, project_id=project_id, kwargs={"tag": "a"}
    )
    assert wait_for(lambda: tasks.effects("a"))
    assert tasks.effects("a") == [task_id]
    assert not [k for k in redis_client.keys("_kombu.binding.*") if "project" in k]
