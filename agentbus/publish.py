"""Putting work on a project's queue, and the base class of every task that runs there."""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from celery import Task
from celery.exceptions import Ignore
from celery.result import AsyncResult
from django.conf import settings

from . import guard, transport
from .active import mark_active
from .queues import direct_queue, project_queue

logger = logging.getLogger(__name__)


def publish(
    task: Task,
    *,
    project_id: uuid.UUID | str,
    kwargs: dict[str, Any] | None = None,
    task_id: str | None = None,
    **options: Any,
) -> AsyncResult:
    """Put `task` on the project's queue, with `project_id` among its keyword arguments;
    `options` are Celery's execution options (countdown, eta, ...).

    The queue is marked active first (and announced to the shared workers if it was
    not), so the message never lands in a queue the pool has no reason to follow. A
    task of a deleted project is not sent (it could not run anyway): ProjectGone.
    Raises while Redis or the broker is down.
    """
    if not isinstance(task, AgentBusTask):
        raise TypeError(f"{task!r} is not an AgentBusTask: it would not check its project")
    payload = dict(kwargs or {})
    payload["project_id"] = str(uuid.UUID(str(project_id)))
    task_id = task_id or str(uuid.uuid4())
    if mark_active(project_id) < 0:
        logger.info("not sending %s[%s]: project %s was deleted", task.name, task_id, project_id)
        raise guard.ProjectGone(str(project_id))
    for name in ("queue", "exchange", "routing_key", "declare"):
        options.pop(name, None)
    return Task.apply_async(
        task,
        kwargs=payload,
        task_id=task_id,
        queue=direct_queue(project_queue(project_id)),
        declare=[],
        **options,
    )


class AgentBusTask(Task):
    """Base class of every task that runs on a project's queue.

    `task.delay(project_id=..., ...)` (or apply_async, retry, a signature) goes to the
    project's queue through `publish`. Before the body runs, a task of a deleted project
    is skipped (the lifecycle guard): logged, acknowledged, state IGNORED. That holds for
    messages restored from `unacked` after a crash too, since they run through here.
    Runs are at-least-once (acks_late; a worker lost mid-task gives the message back),
    so task bodies must be idempotent.
    """

    acks_late = True
    reject_on_worker_lost = True

    def apply_async(self, args=None, kwargs=None, task_id=None, **options):
        if args:
            raise TypeError(f"{self.name} takes keyword arguments only")
        kwargs = dict(kwargs or {})
        try:
            project_id = kwargs.pop("project_id")
        except KeyError as exc:
            raise TypeError(f"{self.name} needs project_id") from exc
        return publish(self, project_id=project_id, kwargs=kwargs, task_id=task_id, **options)

    def __call__(self, *args, **kwargs):
        project_id = kwargs.get("project_id")
        if project_id is not None and self._project_gone(project_id):
            logger.info(
                "skipping %s[%s]: project %s was deleted", self.name, self.request.id, project_id
            )
            raise Ignore()
        return super().__call__(*args, **kwargs)

    def _project_gone(self, project_id) -> bool:
        """The guard, answered by the worker's transport when it delivered the message
        (same round trip as recording the delivery) if that was a moment ago; else
        asked now (a message that waited for a free pool slot, or kombu's own channel)."""
        checked = getattr(self.request, transport.CHECKED_HEADER, None)
        if checked is not None and time.time() - checked < settings.AGENTBUS_GUARD_FRESH_SECONDS:
            return bool(getattr(self.request, transport.GONE_HEADER, True))
        return guard.project_gone(project_id)
