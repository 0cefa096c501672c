"""Every queue name and task route of the system, in one place.

The AgentBus is one Celery queue per project. Maintenance work (teardown, sweeps,
the queue reaper) has its own queue, which every shared worker always follows.
"""

from __future__ import annotations

import uuid

MAINTENANCE_QUEUE = "uws.maintenance"
PROJECT_QUEUE_PREFIX = "uws.project."


def project_queue(project_id: uuid.UUID | str) -> str:
    """The AgentBus queue of one project."""
    return f"{PROJECT_QUEUE_PREFIX}{uuid.UUID(str(project_id)).hex}"


def project_id_from_queue(queue: str) -> uuid.UUID | None:
    """The project a queue belongs to, or None for a queue that is not a project's."""
    if not queue.startswith(PROJECT_QUEUE_PREFIX):
        return None
    try:
        return uuid.UUID(queue[len(PROJECT_QUEUE_PREFIX) :])
    except ValueError:
        return None
