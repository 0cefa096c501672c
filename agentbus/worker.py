"""The AgentBus side of a Celery worker: which project queues it consumes.

A worker runs in one of two modes:

- **shared** (`celery -A config worker -Q uws.maintenance`): follows the maintenance
  queue plus the queues of *active* projects (agentbus.active). It joins a queue when a
  producer announces it (`agentbus_follow` broadcast), leaves it when the reaper or a
  project deletion retires it (`agentbus_unfollow`), and every
  AGENTBUS_RECONCILE_SECONDS converges on the active set in Redis, because Redis
  broadcasts are fire-and-forget: a worker that was reconnecting or busy still ends up
  following exactly the active queues.
- **dedicated** (`celery -A config worker -Q uws.project.<hex>`): consumes its -Q
  queues only and ignores the active set and the broadcasts.

A shared worker takes project tasks from the ready list (agentbus.transport): no poll
names a project queue, so following one is what operators see (`inspect
active_queues`, Flower) and what kombu's own channel would poll, never what delivers.
Newly active queues are therefore followed just after their first task, and thousands
at worker start a step at a time once the worker polls.

The mode follows from -Q: naming any project queue makes the worker dedicated. The
worker option `--agentbus-mode {auto,shared,dedicated}` overrides it.

The broadcasts are our own control commands rather than Celery's `add_consumer` /
`cancel_consumer` (which every worker obeys, dedicated ones included); they call the
same Consumer.add_task_queue / cancel_task_queue machinery. Each checks the active set
before acting, so broadcasts that arrive out of order (retired, then re-activated) end
in the right state. `celery -A config inspect agentbus_status` shows each worker's mode
and followed queues; Flower's Broker tab lists the queues workers report through
`inspect active_queues`, which includes the followed project queues.
"""

from __future__ import annotations

import logging
import time

from celery import bootsteps
from celery.worker.control import control_command, inspect_command, ok
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from .active import (
    FOLLOW_COMMAND,
    STATUS_COMMAND,
    UNFOLLOW_COMMAND,
    active_among,
    active_queues,
    sweep_ready,
    worker_alive,
    worker_connected,
    worker_gone,
)
from .broker import uses_amqp
from .queues import direct_queue, is_project_queue
from .transport import (
    batched,
    check_kombu,
    flow_control_on,
    flush_served,
    renew_slots,
    use_ready_list,
    wake,
)

logger = logging.getLogger(__name__)

SHARED = "shared"
DEDICATED = "dedicated"
# With the ready list, at most this many newly active queues are followed per step.
FOLLOW_STEP = 1000
FIRST_FOLLOW_STEP = 100
FOLLOW_DELAY_SECONDS = 0.2


def to_follow(by_use: list[str], followed: set[str]) -> list[str]:
    """The active queues not followed yet, most recently used first: those are where
    tasks wait now (on RabbitMQ a task is delivered only once its queue is consumed), so
    a worker starting beside thousands of active queues takes them in its first, small
    step (FIRST_FOLLOW_STEP) instead of after following the rest."""
    return [queue for queue in reversed(by_use) if queue not in followed]


class AgentBusConsumer(bootsteps.StartStopStep):
    """Consumer bootstep: decides the worker's mode and keeps a shared worker's
    project queues equal to the active set."""

    requires = ("celery.worker.consumer.tasks:Tasks",)
    name = "AgentBus"

    def __init__(self, c, agentbus_mode: str | None = "auto", **kwargs):
        super().__init__(c, **kwargs)
        self.requested_mode = agentbus_mode or "auto"
        self.mode: str | None = None
        self.timer_ref = None
        self.heartbeat_ref = None
        self.heartbeat_failed = False
        self.renew_ref = None
        self.reconciled_at: float | None = None
        self.ready_list = False
        # On RabbitMQ every followed queue is a consumer the broker delivers through:
        # thousands at start are declared and consumed a step at a time, pipelined.
        self.amqp = uses_amqp()
        c.agentbus = self
        check_visibility_timeout()
        check_kombu()

    # --- lifecycle (start runs again after every broker reconnection) -------------
    def start(self, c):
        if self.mode is None:
            self.mode = self._decide_mode(c)
            logger.info("AgentBus: %s worker", self.mode)
        try:
            worker_connected(c.hostname, mode=self.mode)
            self.heartbeat_failed = False
        except Exception:
            logger.debug("AgentBus: heartbeat failed", exc_info=True)
            self.heartbeat_failed = True  # the next beat that goes through says so
        if self.heartbeat_ref is None:
            self.heartbeat_ref = c.timer.call_repeatedly(
                settings.AGENTBUS_HEARTBEAT_SECONDS, self._heartbeat_safely, (c,), priority=10
            )
        if self.mode != SHARED:
            return
        # Take project tasks from the ready list: no poll names a project queue.
        self.ready_list = use_ready_list(c.task_consumer.channel) if c.task_consumer else False
        if self.ready_list or self.amqp:
            # Delivery does not wait for following (the ready list names the queue), so
            # thousands of active queues are followed a step at a time once the worker
            # polls, not before its first task.
            c.timer.call_after(0, self._follow_in_steps, (c,), priority=10)
        else:
            self.reconcile(c)
        if self.timer_ref is None:
            self.timer_ref = c.timer.call_repeatedly(
                settings.AGENTBUS_RECONCILE_SECONDS, self._reconcile_safely, (c,), priority=10
            )
        if self.renew_ref is None and self.ready_list and flow_control_on():
            # Capped slots held by this worker's messages live while it renews them; the
            # takes it counted itself are added to the served counters on the same beat
            # (flow control off: no slot is taken, no take counted).
            self.renew_ref = c.timer.call_repeatedly(
                settings.AGENTBUS_SLOT_LEASE_SECONDS / 3, self._renew_safely, (c,), priority=10
            )

    def stop(self, c):
        for ref in (self.timer_ref, self.heartbeat_ref, self.renew_ref):
            if ref is not None:
                ref.cancel()
        self.timer_ref = self.heartbeat_ref = self.renew_ref = None
        if self.ready_list and c.task_consumer is not None:
            try:
                flush_served(c.task_consumer.channel)
            except Exception:
                logger.debug("AgentBus: could not add up the served counts", exc_info=True)

    def shutdown(self, c):
        self.stop(c)
        try:
            worker_gone(c.hostname)
        except Exception:
            logger.debug("AgentBus: could not say goodbye", exc_info=True)

    def _heartbeat_safely(self, c) -> None:
        try:
            if self.heartbeat_failed:
                # Redis was out of reach: what this worker wrote to it meanwhile (a failed
                # task given back, a task marked received) may be lost, and the work it
                # holds would look held for good. It comes back as a new incarnation, so
                # the recovery passes send that work again (a broker on this Redis does
                # the same: the consumer reconnects).
                worker_connected(c.hostname, mode=self.mode or "")
                logger.warning("AgentBus: Redis answers again; this worker starts afresh")
            else:
                worker_alive(c.hostname, mode=self.mode or "")
            self.heartbeat_failed = False
        except Exception:
            if not self.heartbeat_failed:
                logger.warning("AgentBus: heartbeat failed (Redis out of reach)", exc_info=True)
            self.heartbeat_failed = True

    def _renew_safely(self, c) -> None:
        try:
            if c.task_consumer is not None:
                renew_slots(c.task_consumer.channel)
                flush_served(c.task_consumer.channel)
        except Exception:
            # Redis down: the leases may end, and the slots come back to the project.
            logger.warning("AgentBus: could not renew slots", exc_info=True)

    def _decide_mode(self, c) -> str:
        if self.requested_mode in (SHARED, DEDICATED):
            return self.requested_mode
        selected = c.app.amqp.queues.consume_from
        return DEDICATED if any(is_project_queue(name) for name in selected) else SHARED

    # --- converging on the active set ---------------------------------------------
    def followed(self, c) -> set[str]:
        """Project queues this worker consumes now."""
        if c.task_consumer is None:
            return set()
        return {q.name for q in c.task_consumer.queues if is_project_queue(q.name)}

    def reconcile(self, c) -> bool:
        """Converge on the active set; with the ready list, at most FOLLOW_STEP new
        queues a call. Returns whether queues are left to follow."""
        if c.task_consumer is None:
            return False
        by_use = active_queues()  # oldest use first
        wanted = set(by_use)
        followed = self.followed(c)
        self.unfollow(c, followed - wanted)
        missing = to_follow(by_use, followed)
        step = FOLLOW_STEP if self.reconciled_at is not None else FIRST_FOLLOW_STEP
        now = missing[:step] if self.ready_list or self.amqp else missing
        self.follow(c, now)
        self.reconciled_at = time.time()
        if self.ready_list:
            sweep_ready()
        return len(now) < len(missing)

    def _follow_in_steps(self, c) -> None:
        try:
            more = self.reconcile(c)
        except Exception:
            logger.warning("AgentBus: reconcile failed", exc_info=True)
            return  # the periodic reconcile goes on
        if more:
            c.timer.call_after(0.01, self._follow_in_steps, (c,), priority=10)

    def _reconcile_safely(self, c) -> None:
        try:
            self.reconcile(c)
        except Exception:
            # Redis down or reconnecting: keep consuming what we have, try again later.
            logger.warning("AgentBus: reconcile failed", exc_info=True)

    def follow(self, c, queues) -> list[str]:
        cset = c.task_consumer
        if cset is None:
            return []
        table = c.app.amqp.queues
        added = []
        # One set, not kombu's consuming_from (a scan of every followed queue per name:
        # quadratic, seconds of the event loop at 10,000, while tasks wait for it).
        consuming = {q.name for q in cset.queues}
        for name in sorted(queues):
            if name in consuming:
                continue
            if self.amqp:
                # Declared without waiting for each answer (they pipeline with the
                # basic.consume that follow on the same channel).
                auto_declare, cset.auto_declare = cset.auto_declare, False
                try:
                    cset.add_queue(table.select_add(direct_queue(name))).declare(nowait=True)
                finally:
                    cset.auto_declare = auto_declare
            else:
                cset.add_queue(table.select_add(direct_queue(name)))
            consuming.add(name)
            added.append(name)
        if added:
            with batched(cset.channel):
                cset.consume()
            if self.amqp:
                self._on_broker_cancel(c, added)
            logger.info("AgentBus: following %d more queue(s): %s", len(added), added[:5])
            # A BRPOP already waiting does not include the new queues: cut it short
            # (with the ready list no poll names them: nothing to cut short).
            try:
                if not self.ready_list:
                    wake(cset.channel)
            except Exception:
                logger.debug("AgentBus: could not wake the poll", exc_info=True)
        return added

    def _on_broker_cancel(self, c, names) -> None:
        """RabbitMQ cancels the consumers of a queue it deletes (a project's teardown may
        delete it before this worker heard the unfollow): leave the queue then, instead
        of py-amqp raising ConsumerCancelled, which restarts the whole consumer."""
        cset = c.task_consumer
        callbacks = getattr(cset.channel, "cancel_callbacks", None)
        if callbacks is None:
            return
        for name in names:
            tag = cset._active_tags.get(name)  # kombu keeps the consumer tag per queue here
            if tag is not None:
                callbacks[tag] = lambda _tag, name=name: c.call_soon(self._left_by_broker, c, name)

    def _left_by_broker(self, c, name) -> None:
        try:
            self.unfollow(c, [name])
        except Exception:
            logger.warning("AgentBus: could not leave %s", name, exc_info=True)

    def unfollow(self, c, queues) -> list[str]:
        cset = c.task_consumer
        if cset is None:
            return []
        table = c.app.amqp.queues
        removed = []
        consuming = {q.name for q in cset.queues}
        with batched(cset.channel):
            for name in sorted(queues):
                table.deselect(name)
                if name in consuming:
                    cset.cancel_by_queue(name)
                    removed.append(name)
                table.pop(name, None)  # the routing table need not remember every project
        if removed:
            logger.info("AgentBus: left %d queue(s): %s", len(removed), removed[:5])
        return removed


def check_visibility_timeout() -> None:
    """visibility_timeout must exceed the longest a task really runs. Celery's time
    limits bind in the prefork pool only (its thread pool ignores them, celery#9203);
    in any pool an agent run keeps its own deadline, and may get the soft-shutdown
    window on top."""
    if uses_amqp():
        return  # RabbitMQ gives a message back only when its consumer's connection ends
    options = settings.CELERY_BROKER_TRANSPORT_OPTIONS or {}
    visibility = options.get("visibility_timeout", 3600)
    limits = {
        "CELERY_TASK_TIME_LIMIT": getattr(settings, "CELERY_TASK_TIME_LIMIT", None) or 0,
        "RUN_TIME_LIMIT_SECONDS + CELERY_WORKER_SOFT_SHUTDOWN_TIMEOUT": (
            getattr(settings, "RUN_TIME_LIMIT_SECONDS", 0)
            + (getattr(settings, "CELERY_WORKER_SOFT_SHUTDOWN_TIMEOUT", 0) or 0)
        ),
    }
    name, longest = max(limits.items(), key=lambda item: item[1])
    if longest and visibility <= longest:
        raise ImproperlyConfigured(
            f"visibility_timeout ({visibility}s) must exceed {name} ({longest:g}s), or "
            "Redis hands a running task to a second worker"
        )


def _shared_step(state):
    step = getattr(state.consumer, "agentbus", None)
    if step is None or step.mode != SHARED:
        return None
    return step


def _queue_list(queues, queue) -> list[str]:
    names = list(queues or [])
    if queue:
        names.append(queue)
    return [n for n in names if is_project_queue(n)]


@control_command(name=FOLLOW_COMMAND, args=[("queue", str)], signature="<queue>")
def agentbus_follow(state, queues=None, queue=None, **_):
    """Shared AgentBus workers: start consuming project queues that are active."""
    step = _shared_step(state)
    names = _queue_list(queues, queue)
    if step is None or not names:
        return ok("ignored")
    consumer = state.consumer
    wanted = active_among(names)
    if step.ready_list:
        # Following is for operators' eyes only (the ready list delivers): done a moment
        # later, off the path of the queue's first task, which is arriving now; the
        # active set is asked again then (an unfollow may have come in between).
        consumer.timer.call_after(FOLLOW_DELAY_SECONDS, _follow_if_active, (step, consumer, wanted))
    else:
        consumer.call_soon(step.follow, consumer, wanted)
    return ok(f"following {len(wanted)} queue(s)")


def _follow_if_active(step, consumer, names) -> None:
    try:
        step.follow(consumer, active_among(names))
    except Exception:
        logger.warning("AgentBus: follow failed", exc_info=True)  # reconcile repairs it


@control_command(name=UNFOLLOW_COMMAND, args=[("queue", str)], signature="<queue>")
def agentbus_unfollow(state, queues=None, queue=None, **_):
    """Shared AgentBus workers: stop consuming project queues that are not active."""
    step = _shared_step(state)
    names = _queue_list(queues, queue)
    if step is None or not names:
        return ok("ignored")
    consumer = state.consumer
    # A queue re-activated since the retirement stays followed.
    gone = set(names) - active_among(names)
    consumer.call_soon(step.unfollow, consumer, gone)
    return ok(f"leaving {len(gone)} queue(s)")


@inspect_command(name=STATUS_COMMAND)
def agentbus_status(state, **_):
    """The worker's AgentBus mode, the project queues it follows, its broker transport."""
    consumer = state.consumer
    step = getattr(consumer, "agentbus", None)
    connection = getattr(consumer, "connection", None)
    transport_cls = type(connection.transport) if connection is not None else None
    channel = getattr(getattr(consumer, "task_consumer", None), "channel", None)
    return {
        "mode": step.mode if step else None,
        "queues": sorted(step.followed(consumer)) if step else [],
        "reconciled_at": step.reconciled_at if step else None,
        "transport": (
            f"{transport_cls.__module__}.{transport_cls.__qualname__}" if transport_cls else None
        ),
        "cached_poll": bool(getattr(channel, "takes_over", False)),
        "ready_list": bool(getattr(channel, "ready_mode", False)),
    }
