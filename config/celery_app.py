"""The Celery app: broker settings come from Django settings (CELERY_*); queue layout,
routes, the AgentBus worker bootstep and the beat schedule are set here.

Workers come in two modes (see workspaces/worker.py):

- shared:    celery -A config worker -Q uws.maintenance
             follows the maintenance queue and the queues of *active* projects only,
             joining and leaving them as projects become active or are reaped;
- dedicated: celery -A config worker -Q uws.project.<project uuid hex>
             (or `python manage.py agentbus_worker --project <uuid>`)
             serves one project's queue and ignores the active set.

The mode follows from -Q (any project queue there means dedicated); the worker option
`--agentbus-mode {auto,shared,dedicated}` overrides it.
"""

import os
from urllib.parse import urlparse

import click
from celery import Celery, signals
from celery.app.amqp import AMQP

from workspaces.queues import MAINTENANCE_QUEUE, TASK_ROUTES, DirectQueues, direct_queue

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.local")


class DirectAMQP(AMQP):
    """Celery's AMQP layer with a queue table that never binds exchanges per queue."""

    queues_cls = DirectQueues


app = Celery("config", amqp=DirectAMQP, include=["workspaces.bus_tasks"])
app.config_from_object("django.conf:settings", namespace="CELERY")
# Set before Django settings load (pending configuration), and they win over them.
app.conf.update(
    task_default_queue=MAINTENANCE_QUEUE,
    task_queues=[direct_queue(MAINTENANCE_QUEUE)],
    task_routes=TASK_ROUTES,
)
app.conf.beat_schedule = {
    # Retires project queues that are empty and idle, and rescues stranded ones.
    "workspaces.reap_idle_queues": {
        "task": "workspaces.reap_idle_queues",
        "schedule": 30.0,
        "options": {"expires": 30.0},
    },
    # Re-dispatches owed workspace teardowns and tears down leftovers with no project.
    "workspaces.sweep": {
        "task": "workspaces.sweep",
        "schedule": float(os.environ.get("WORKSPACE_SWEEP_SECONDS", 300)),
        "options": {"expires": 60.0},
    },
    # Drops vector collections of deleted agents and projects (runs where Qdrant is open).
    "agents.sweep_collections": {
        "task": "agents.sweep_collections",
        "schedule": float(os.environ.get("WORKSPACE_SWEEP_SECONDS", 300)),
        "options": {"expires": 60.0},
    },
}
app.autodiscover_tasks()

app.user_options["worker"].add(
    click.Option(
        ["--agentbus-mode"],
        type=click.Choice(["auto", "shared", "dedicated"]),
        default="auto",
        show_default=True,
        help="AgentBus mode: shared workers follow the active project queues, a "
        "dedicated worker only its -Q queues. auto: dedicated if -Q names a project queue.",
    )
)
app.steps["consumer"].add("workspaces.worker:AgentBusConsumer")


@signals.celeryd_init.connect
def _cheaper_poll_for_workers(conf=None, **_):
    """Workers poll with AGENTBUS_WORKER_TRANSPORT (workspaces.transport: the same BRPOP,
    less client work per message). Only workers: other processes keep kombu's name for
    the transport in broker URLs, which Flower reads."""
    from django.conf import settings

    if conf is None or conf.broker_transport or not settings.AGENTBUS_WORKER_TRANSPORT:
        return
    if urlparse(conf.broker_url or "").scheme in ("redis", "rediss"):
        conf.broker_transport = settings.AGENTBUS_WORKER_TRANSPORT
