"""A shared worker starting beside many active queues follows the most recently used
first, in a small first step: on RabbitMQ a task is delivered only from a consumed
queue, so the queues tasks wait in now must not wait behind thousands of idle ones."""

from __future__ import annotations

import time
import uuid

from agentbus import active
from agentbus.queues import project_queue
from agentbus.worker import FIRST_FOLLOW_STEP, FOLLOW_STEP, to_follow


def test_the_most_recently_used_queues_come_first(redis_client):
    projects = [uuid.uuid4() for _ in range(300)]
    for project in projects:
        active.mark_active(project)
    time.sleep(0.002)  # the active set's scores are times
    active.mark_active(projects[0])  # used again just now: a task waits in it

    order = to_follow(active.active_queues(), followed={project_queue(projects[-1])})

    assert order[0] == project_queue(projects[0])
    assert project_queue(projects[-1]) not in order  # already followed
    assert len(order) == len(projects) - 1
    assert FIRST_FOLLOW_STEP < FOLLOW_STEP
