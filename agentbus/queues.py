"""Every queue name and task route of the system, in one place, and the Celery queue
table that keeps them direct.

The AgentBus is one Celery queue per project. Maintenance work (teardown, sweeps) has its
own queue, which every shared worker always follows; the maintenance that must run when
the shared workers are full (the run recovery pass, the queue reaper) has another, which
a maintenance worker follows.

Every queue here is addressed straight by name: messages go to the nameless (default)
exchange with the queue's name as routing key. On Redis that is one LPUSH onto the
queue's list and nothing else: no exchange, no `_kombu.binding.*` set per project, so
a million projects leave no routing tables behind.
"""

from __future__ import annotations

import uuid

from celery.app.amqp import AMQP, Queues
from kombu import Exchange, Queue
from kombu.transport import virtual

MAINTENANCE_QUEUE = "uws.maintenance"
# Maintenance that must not wait behind agent runs (the recovery pass, the queue reaper):
# consumed by a worker of its own (the Procfile's `maintenance` line), whose few threads
# runs never fill. Nothing routed here may open the embedded vector store.
URGENT_MAINTENANCE_QUEUE = "uws.maintenance.urgent"
# Webhook deliveries (automation): a worker of their own (the Procfile's `webhooks` line),
# so a slow endpoint holds none of the threads that run agents or maintenance.
WEBHOOK_QUEUE = "uws.webhooks"
PROJECT_QUEUE_PREFIX = "uws.project."

# The nameless exchange: the routing key is the destination queue.
DIRECT = Exchange("")


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


def is_project_queue(queue: str) -> bool:
    return project_id_from_queue(queue) is not None


def runs_project_tasks(queues) -> bool:
    """Whether a worker consuming `queues` runs projects' tasks (agent runs, their vector
    work): it follows the maintenance queue, through which the shared pool learns its
    projects' queues, or a project's queue. Not the urgent maintenance or webhooks ones."""
    return any(q == MAINTENANCE_QUEUE or is_project_queue(q) for q in queues)


class DirectQueue(Queue):
    """A queue on the nameless exchange, declared only where the broker needs it.

    The Redis transport (any kombu virtual transport) needs no declaration (the list
    appears with the first message), so following one costs no Redis round trip. AMQP
    (RabbitMQ) drops a message routed to a queue that does not exist, and closes the
    channel of a consumer of one: there the queue is declared (durable; no exchange, no
    binding). `nowait` declares pipeline: a shared worker following thousands of queues
    sends them without waiting for each answer (agentbus.worker).
    """

    def declare(self, nowait=False, channel=None):
        channel = channel or self.channel
        if self.no_declare or isinstance(channel, virtual.Channel):
            return self.name
        self.queue_declare(nowait=nowait, passive=False, channel=channel)
        return self.name


def direct_queue(name: str) -> Queue:
    """A kombu queue addressed straight by name (see the module docstring)."""
    return DirectQueue(name, DIRECT, routing_key=name)


class DirectQueues(Queues):
    """Celery's queue table, keeping every queue on the nameless exchange.

    Stock Celery gives a queue it has not seen (`-Q name`, `add_consumer`, publishing
    with `task_create_missing_queues`) an exchange of the same name and binds it, and
    swaps a nameless exchange for `task_default_exchange`: on Redis either writes a
    binding per project queue. Here every queue stays direct-to-queue.
    """

    def new_missing(self, name: str) -> Queue:
        return direct_queue(name)

    def add_compat(self, name: str, **options) -> Queue:
        # `add_consumer` passes exchange=<queue name>; a project queue never gets one.
        if is_project_queue(name):
            return self._add(direct_queue(name))
        return super().add_compat(name, **options)

    def _add(self, queue: Queue) -> Queue:
        if queue.exchange is None or not queue.exchange.name:
            queue.exchange = DIRECT
            queue.routing_key = queue.routing_key or queue.name
        self[queue.name] = queue
        return queue


class DirectAMQP(AMQP):
    """Celery's AMQP layer with a queue table that never binds exchanges per queue."""

    queues_cls = DirectQueues
