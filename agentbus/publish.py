"""Putting work on a project's queue, and the base class of every task that runs there."""

from __future__ import annotations

import contextlib
import logging
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any

from celery import Task, current_app
from celery.exceptions import Ignore
from celery.result import AsyncResult
from celery.utils.saferepr import saferepr
from django.conf import settings
from kombu import serialization
from kombu.entity import DELIVERY_MODES
from kombu.pools import ProducerPool
from kombu.utils.imports import symbol_by_name

from common.lifecycle import outage_waited
from common.redis import broker_redis
from common.tracing import (
    PUBLISHED_AT_HEADER,
    log_context,
    publish_headers,
    span,
    span_between,
    tracing_enabled,
)

from .active import FOLLOW_COMMAND, broadcast, mark_active
from .broker import (
    BLOCKED,
    BrokerBlocked,
    amqp_blocked,
    amqp_publish_options,
    uses_amqp,
    uses_redis,
)
from .guard import ProjectGone, project_gone
from .queues import direct_queue, project_queue
from .transport import (
    CHECKED_HEADER,
    GONE_HEADER,
    INTERACTIVE,
    LANE_HEADER,
    LANES,
    message_for_queue,
    message_push,
)

logger = logging.getLogger(__name__)

# This process's producers on the bus's transport, per (pid, broker URL): a forked child
# makes its own, and so does an app pointed at another broker.
_producers: dict[tuple[int, str], ProducerPool] = {}


def _producers_key() -> tuple[int, str]:
    conf = current_app.conf
    return (os.getpid(), str(conf.broker_write_url or conf.broker_url))


def _bus_producers(key: tuple[int, str]) -> ProducerPool | None:
    """Producers whose channel publishes through the bus's transport (one round trip:
    the PUBLISH script of agentbus.transport); on RabbitMQ, producers whose publishes
    wait for the broker's confirm and stop at its alarm (amqp_publish_options); None
    where the bus runs on kombu's own Redis transport (AGENTBUS_WORKER_TRANSPORT empty)."""
    app = current_app
    pool = _producers.get(key)
    if pool is None:
        if uses_amqp():
            options = amqp_publish_options(key[1])
            connection = app.connection_for_write(transport_options=options)
        elif settings.AGENTBUS_WORKER_TRANSPORT and uses_redis():
            transport = symbol_by_name(settings.AGENTBUS_WORKER_TRANSPORT)
            connection = app.connection_for_write(transport=transport)
        else:
            return None
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
    key = _producers_key()
    direct = _direct.get(key)
    # The settings' broker is broker_redis()'s: a test may point the app elsewhere.
    if direct is not None and key[1] == settings.CELERY_BROKER_URL and _plain(task, options):
        return _publish_direct(task, project_id, queue, payload, task_id, options, direct)
    amqp = uses_amqp()
    if amqp and amqp_blocked(key[1]):
        raise BrokerBlocked(BLOCKED)
    pool = _bus_producers(key)
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
            try:
                result = Task.apply_async(
                    task,
                    kwargs=payload,
                    task_id=task_id,
                    queue=target,
                    # On Redis nothing to declare; on RabbitMQ the queue, before the
                    # publish on the same channel (once per connection: kombu remembers).
                    declare=[target] if amqp else [],
                    producer=producer,
                    **options,
                )
            except BrokerBlocked:
                producer.connection.collect()  # the broker reads nothing more from it
                raise
            # The producer's channel now (a publish retried after a connection error
            # runs on a revived one).
            outcome = getattr(producer.channel, "last_put", None) if scripted else None
            if scripted and key not in _direct:
                _direct_learn(key, task, producer.channel)
    _published(task, project_id, queue, task_id, outcome)
    return result


def _published(task, project_id, queue, task_id, outcome) -> None:
    if outcome == -1:
        logger.info("not sending %s[%s]: project %s was deleted", task.name, task_id, project_id)
        raise ProjectGone(str(project_id))
    if outcome == 1:
        broadcast(FOLLOW_COMMAND, [queue], swallow=True)


@dataclass(frozen=True)
class _Direct:
    """What a publish without apply_async needs of the app's configuration."""

    delivery_mode: int
    repr_maxlevels: int


# Per (pid, broker URL), learnt from the first publish through the bus's channel
# (apply_async): how to publish without apply_async there. Absent where that channel is
# not the PUBLISH script's with kombu's base64 bodies, or broker_redis() is another
# Redis, or Celery sends task-sent events.
_direct: dict[tuple[int, str], _Direct] = {}


def _direct_learn(key, task, channel) -> None:
    conf = task._get_app().conf
    if (
        channel.body_encoding == "base64"
        and key[1] == settings.CELERY_BROKER_URL
        and not conf.task_send_sent_event
    ):
        mode = conf.task_default_delivery_mode
        _direct[key] = _Direct(DELIVERY_MODES.get(mode, mode), conf.task_repr_maxlevels)


def _plain(task, options) -> bool:
    """A send apply_async would make without routing, result nor parent: no countdown, eta,
    expiry or priority, an ignored result, no task running in this thread (Celery would
    make this one its child), and tracing off (its Celery instrumentation traces the send
    from apply_async's signals). That is every chat message an untraced web process
    accepts."""
    return (
        not tracing_enabled()
        and options.keys() == {"headers"}
        and task.ignore_result
        and task.expires is None
        and task.priority is None
        and task._get_app().current_worker_task is None
    )


def _publish_direct(task, project_id, queue, payload, task_id, options, direct) -> AsyncResult:
    """What apply_async would push, pushed in one script call on the broker's client:
    Celery's message (protocol 2) in kombu's envelope (agentbus.transport), without
    Celery's routing and kombu's producer on the way (about 0.2 ms of CPU a publish).
    tests/agentbus/test_publish_direct.py holds the two messages equal."""
    app = task._get_app()
    message_headers, properties, body, _ = app.amqp.create_task_message(
        task_id, task.name, (), payload,
        reply_to=app.thread_oid,
        time_limit=task.time_limit,
        soft_time_limit=task.soft_time_limit,
        ignore_result=True,
        argsrepr="()",
        kwargsrepr=saferepr(payload, app.amqp.kwargsrepr_maxsize, maxlevels=direct.repr_maxlevels),
    )  # fmt: skip
    message_headers.update(options["headers"])
    content_type, content_encoding, data = serialization.dumps(body, serializer=task.serializer)
    message = message_for_queue(
        body=data if isinstance(data, bytes) else data.encode(content_encoding),
        content_type=content_type,
        content_encoding=content_encoding,
        headers=message_headers,
        properties={**properties, "delivery_mode": direct.delivery_mode},
        queue=queue,
    )
    _published(task, project_id, queue, task_id, message_push(broker_redis(), queue, message))
    result = task.AsyncResult(task_id)
    result.ignored = True
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
            # A Redis out of reach is waited out: the task stays this worker's.
            if project_id is not None and outage_waited(
                lambda: self._project_gone(project_id), what=f"{self.name}[{self.request.id}]"
            ):
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
