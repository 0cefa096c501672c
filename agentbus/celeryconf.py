"""How the AgentBus shapes the project's Celery app (called from config/celery_app.py):
a queue table that never binds exchanges, the maintenance queue as the default, the
worker's AgentBus step and its `--agentbus-mode` option, and the workers' transport."""

from __future__ import annotations

from urllib.parse import urlparse

import click
from celery import Celery, signals
from django.conf import settings

from .queues import MAINTENANCE_QUEUE, DirectAMQP, direct_queue


def configure_celery(app: Celery) -> None:
    app.amqp_cls = DirectAMQP
    # Set before Django settings load (pending configuration), and they win over them.
    app.conf.update(
        task_default_queue=MAINTENANCE_QUEUE,
        task_queues=[direct_queue(MAINTENANCE_QUEUE)],
    )
    app.user_options["worker"].add(
        click.Option(
            ["--agentbus-mode"],
            type=click.Choice(["auto", "shared", "dedicated"]),
            default="auto",
            show_default=True,
            help="AgentBus mode: shared workers follow the active project queues, a "
            "dedicated worker only its -Q queues. auto: dedicated if -Q names a project "
            "queue.",
        )
    )
    app.steps["consumer"].add("agentbus.worker:AgentBusConsumer")
    signals.celeryd_init.connect(_worker_transport, weak=False, dispatch_uid="agentbus.transport")


def _worker_transport(conf=None, **_) -> None:
    """Workers poll through AGENTBUS_WORKER_TRANSPORT (agentbus.transport: shared
    workers take from the ready list, dedicated ones BRPOP their queues with a wake-up
    key). Only workers: other processes keep kombu's name for the transport in broker
    URLs, which Flower reads (`publish` opens its own producers on the bus's transport)."""
    if conf is None or conf.broker_transport or not settings.AGENTBUS_WORKER_TRANSPORT:
        return
    if urlparse(conf.broker_url or "").scheme in ("redis", "rediss"):
        conf.broker_transport = settings.AGENTBUS_WORKER_TRANSPORT
