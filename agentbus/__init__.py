"""The AgentBus: per-project Celery queues and the worker pool that follows the active
ones, with the lifecycle guard that stops a deleted project's work; it knows nothing of
agents, projects' models or chat.

Other apps use this public API:

- `publish(task, project_id=..., kwargs=...)` and `AgentBusTask` (the base class of any
  task that runs on a project's queue);
- `project_gone(project_id)` / `project_gone_async`, `project_tombstone`,
  `project_revive`: the lifecycle guard (agentbus.guard);
- `retire_project`, `queue_depth`, `queue_depths`: a project's queue for its teardown
  and for operators; `live_workers`: the workers' heartbeats, `worker_identity`: this
  worker process's id among them; `broker_health`: health's check of the broker;
- `project_queue`, `MAINTENANCE_QUEUE`, `URGENT_MAINTENANCE_QUEUE`, `WEBHOOK_QUEUE`:
  queue names.
"""

from .active import (
    live_workers,
    on_task_received,
    project_queues_in_keyspace,
    queue_depth,
    queue_depths,
    retire_project,
    worker_identity,
)
from .broker import broker_health
from .guard import (
    ProjectGone,
    ensure_project_alive,
    project_gone,
    project_gone_async,
    project_revive,
    project_tombstone,
)
from .publish import AgentBusTask, publish
from .queues import MAINTENANCE_QUEUE, URGENT_MAINTENANCE_QUEUE, WEBHOOK_QUEUE, project_queue

__all__ = [
    "MAINTENANCE_QUEUE",
    "URGENT_MAINTENANCE_QUEUE",
    "WEBHOOK_QUEUE",
    "AgentBusTask",
    "ProjectGone",
    "broker_health",
    "ensure_project_alive",
    "live_workers",
    "on_task_received",
    "project_gone",
    "project_gone_async",
    "project_queue",
    "project_queues_in_keyspace",
    "project_revive",
    "project_tombstone",
    "publish",
    "queue_depth",
    "queue_depths",
    "retire_project",
    "worker_identity",
]
