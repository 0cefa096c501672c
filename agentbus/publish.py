"""Putting work on a project's queue, and the base class of every task that runs there."""

from __future__ import annotations

import contextlib
import logging
import os
import time
import uuid
from typing import Any

from celery import Task, current_app
from celery.exceptions import Ignore
from celery.result import AsyncResult
from django.conf import settings
from kombu.pools import ProducerPool
from kombu.utils.imports import symbol_by_name

from common.tracing import PUBLISHED_AT_HEADER, log_context, publish_headers, span, span_between

from .active import FOLLOW_COMMAND, broadcast, mark_active
from .broker import uses_amqp, uses_redis
from .guard import ProjectGone, project_gone
from .queues import direct_queue, project_queue
from .transport import CHECKED_HEADER, GONE_HEADER, INTERACTIVE, LANE_HEADER, LANES

logger = logging.getLogger(__name__)

# This process's producers on the bus's transport, per (pid, broker URL): a forked child
# makes its own, and so does an app pointed at another broker.
_producers: dict[tuple[int, str], ProducerPool] = {}


def _bus_producers() -> ProducerPool | None:
    """Producers whose channel publishes through the bus's transport (one round trip:
    the PUBLISH script of agentbus.transport), or None where the bus runs on kombu's own
    transport (AGENTBUS_WORKER_TRANSPORT empty)."""
    if not settings.AGENTBUS_WORKER_TRANSPORT or not uses_redis():
        return None  # kombu's own transport (on RabbitMQ: the pyamqp one)
    app = current_app
    key = (os.getpid(), str(app.conf.broker_write_url or app.conf.broker_url))
    pool = _producers.get(key)
    if pool is None:
        transport = symbol_by_name(settings.AGENTBUS_WORKER_TRANSPORT)
        connection = app.connection_for_write(transport=transport)
        limit = app.conf.broker_pool_limit
        pool = ProducerPool(connection.Pool(limit=limit), limit=limit, Producer=app.amqp.Producer)
        _producers.clear()  # pools of another process or broker are not used again
        _producers[key] = pool
    return pool


def publish(
    task: Task,
    *,
    project_id: uuid.UUID | str,
    kwargs: dict[str, Any] | None = None,
    task_id: str | None = None,
    lane: str | None = None,
    **options: Any,
) -> AsyncResult:
    """Put `task` on the project's queue, with `project_id` among its keyword arguments;
    `options` are Celery's execution options (countdown, eta, ...).

    One round trip: the message is pushed, the queue marked active and put on the ready
    list in one script, which refuses a deleted project's task (ProjectGone: nothing
    is sent). A queue that became active is announced to the shared workers. Raises
    while Redis or the broker is down.

    `lane` (default: the task class's `lane`): "interactive" (a chat answer) or "bulk"
    (ingest, files, re-embedding, scheduled runs): within the project's share interactive
    work is taken first, and bulk one take in AGENTBUS_BULK_EVERY at least
    (agentbus.flow). Needs the Redis bus; elsewhere both lanes are the project's one queue.
    """
    lane = lane or getattr(task, "lane", INTERACTIVE)  # the task class's, unless told
    if lane not in LANES:
        raise ValueError(f"lane must be one of {LANES}, not {lane!r}")
    if not isinstance(task, AgentBusTask):
        raise TypeError(f"{task!r} is not an AgentBusTask: it would not check its project")
    payload = dict(kwargs or {})
    payload["project_id"] = str(uuid.UUID(str(project_id)))
    task_id = task_id or str(uuid.uuid4())
    for name in ("queue", "exchange", "routing_key", "declare", "producer", "connection"):
        options.pop(name, None)
    if lane != INTERACTIVE:
        options["headers"] = {**(options.get("headers") or {}), LANE_HEADER: lane}
    queue = project_queue(project_id)
    with span("agentbus.publish", **{"messaging.destination.name": queue,
              "celery.task_name": task.name, "uws.project_id": payload["project_id"]}):  # fmt: skip
        # When it was sent (queue-wait metrics and span), and with tracing on the trace
        # context: they travel in the message's headers.
        headers = {PUBLISHED_AT_HEADER: time.time()}
        traced = publish_headers()
        if traced is not None:
            headers.update(traced)
        options["headers"] = {**(options.get("headers") or {}), **headers}
        return _publish(task, project_id, queue, payload, task_id, options)


def _publish(task, project_id, queue, payload, task_id, options) -> AsyncResult:
    amqp = uses_amqp()
    pool = _bus_producers()
    with pool.acquire(block=True) if pool is not None else contextlib.nullcontext() as producer:
        channel = producer.channel if producer is not None else None
        scripted = bool(getattr(channel, "takes_over", False))
        # kombu's own channel: the queue is marked active first, in a round trip of its own.
        if not scripted and mark_active(project_id) < 0:
            outcome = -1
        else:
            if scripted:
                channel.last_put = None
            target = direct_queue(queue)
            result = Task.apply_async(
                task,
                kwargs=payload,
                task_id=task_id,
                queue=target,
                # On Redis nothing to declare; on RabbitMQ the queue, before the publish on
                # the same channel (once per connection: kombu remembers it).
                declare=[target] if amqp else [],
                producer=producer,
                **options,
            )
            # The producer's channel now (a publish retried after a connection error
            # runs on a revived one).
            outcome = getattr(producer.channel, "last_put", None) if scripted else None
    if outcome == -1:
        logger.info("not sending %s[%s]: project %s was deleted", task.name, task_id, project_id)
        raise ProjectGone(str(project_id))
    if outcome == 1:
        broadcast(FOLLOW_COMMAND, [queue], swallow=True)
    return result


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

    # The lane of this task's messages unless publish is told otherwise (agentbus.flow).
    lane = INTERACTIVE

    def apply_async(self, args=None, kwargs=None, task_id=None, **options):
        if args:
            raise TypeError(f"{self.name} takes keyword arguments only")
        kwargs = dict(kwargs or {})
        try:
            project_id = kwargs.pop("project_id")
        except KeyError as exc:
            raise TypeError(f"{self.name} needs project_id") from exc
        options.setdefault("lane", self.lane)
        return publish(self, project_id=project_id, kwargs=kwargs, task_id=task_id, **options)

    def __call__(self, *args, **kwargs):
        project_id = kwargs.get("project_id")
        published = getattr(self.request, PUBLISHED_AT_HEADER, None)
        if published is not None:  # tracing on where it was sent: how long it waited
            span_between("agentbus.queue_wait", start=float(published),
                         **{"messaging.destination.name": self.request.delivery_info and
                            self.request.delivery_info.get("routing_key")})  # fmt: skip
        with log_context(project_id=project_id):
            if project_id is not None and self._project_gone(project_id):
                logger.info(
                    "skipping %s[%s]: project %s was deleted",
                    self.name,
                    self.request.id,
                    project_id,
                )
                raise Ignore()
            return super().__call__(*args, **kwargs)

    def _project_gone(self, project_id) -> bool:
        """The guard, answered by the worker's transport when it delivered the message
        (same round trip as recording the delivery) if that was a moment ago; else
        asked now (a message that waited for a free pool slot, or kombu's own channel)."""
        checked = getattr(self.request, CHECKED_HEADER, None)
        if checked is not None and time.time() - checked < settings.AGENTBUS_GUARD_FRESH_SECONDS:
            return bool(getattr(self.request, GONE_HEADER, True))
        return project_gone(project_id)
