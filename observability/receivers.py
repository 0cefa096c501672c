"""Celery task metrics, from the worker's own signals (observability.metrics)."""

from __future__ import annotations

import time

from celery import signals

from common.tracing import PUBLISHED_AT_HEADER

from .metrics import CELERY_QUEUE_WAIT, CELERY_TASK_SECONDS, CELERY_TASKS

# When each task in flight started, by task id (threads of a worker run many at once).
_started: dict[str, float] = {}


@signals.task_prerun.connect(weak=False, dispatch_uid="observability.task_prerun")
def _task_prerun(task_id=None, task=None, **_kwargs) -> None:
    _started[task_id] = time.perf_counter()
    published = getattr(task.request, PUBLISHED_AT_HEADER, None) if task is not None else None
    if published is not None:
        CELERY_QUEUE_WAIT.labels(task.name).observe(max(0.0, time.time() - float(published)))


@signals.task_postrun.connect(weak=False, dispatch_uid="observability.task_postrun")
def _task_postrun(task_id=None, task=None, state=None, **_kwargs) -> None:
    started = _started.pop(task_id, None)
    name = getattr(task, "name", "unknown")
    CELERY_TASKS.labels(name, state or "UNKNOWN").inc()
    if started is not None:
        CELERY_TASK_SECONDS.labels(name).observe(time.perf_counter() - started)
