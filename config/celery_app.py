"""The Celery app: broker settings come from Django settings (CELERY_*), the AgentBus
shapes the queue table, routes and the worker (agentbus.celeryconf), and the beat
schedule is CELERY_BEAT_SCHEDULE.

Workers come in two modes (agentbus.worker):

- shared:    celery -A config worker -Q uws.maintenance
             follows the maintenance queue and the queues of *active* projects only;
- dedicated: celery -A config worker -Q uws.project.<project uuid hex>
             (or `python manage.py agentbus_worker --project <uuid>`)
             serves one project's queue and ignores the active set.
"""

import os

from celery import Celery, signals
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import connections

# Imported here, not only by AgentbusConfig.ready: its remote-control commands must be
# known wherever the app loads, including `celery -A config inspect agentbus_status`,
# which checks the name locally and sets up no Django apps.
import agentbus.worker  # noqa: F401
from agentbus.celeryconf import configure_celery
from common.tracing import tracing_setup, tracing_shutdown
from governance.secrets import fernet_keys_required_valid

# Production unless told otherwise: `make run` and the tests name theirs.
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.production")

app = Celery("config")
app.config_from_object("django.conf:settings", namespace="CELERY")
configure_celery(app)
app.autodiscover_tasks()


@signals.worker_init.connect
def _refuse_a_bad_fernet_key(**kwargs) -> None:
    # As the web entry points do: a worker with a missing or malformed key would start,
    # then fail every run of a project that has a provider key or tool secret.
    try:
        fernet_keys_required_valid()
    except ImproperlyConfigured as exc:
        # Celery logs and ignores a handler's exception; a SystemExit stops the worker.
        raise SystemExit(f"ImproperlyConfigured: {exc}") from None


@signals.celeryd_init.connect(weak=False, dispatch_uid="config.worker_database_pool")
def _worker_database_pool(**_kwargs) -> None:
    """A worker's run waits for a pooled connection up to DB_WORKER_POOL_TIMEOUT_SECONDS:
    the web's short wait (DB_POOL_TIMEOUT_SECONDS) answers a client 503 quickly, but a
    run that gave up that soon would fail and be run again, costing a provider call."""
    pool = connections["default"].settings_dict.get("OPTIONS", {}).get("pool")
    if isinstance(pool, dict):
        pool["timeout"] = settings.DB_WORKER_POOL_TIMEOUT_SECONDS


@signals.worker_init.connect(weak=False, dispatch_uid="config.worker_tracing")
def _worker_tracing(**_kwargs) -> None:
    # OTEL_* set: each task a span, child of the request that published it (the trace
    # context travels in the message's headers; common.tracing).
    tracing_setup("uws-worker")


@signals.beat_init.connect(weak=False, dispatch_uid="config.beat_tracing")
def _beat_tracing(**_kwargs) -> None:
    tracing_setup("uws-beat")


@signals.worker_shutdown.connect(weak=False, dispatch_uid="config.worker_tracing_flush")
def _worker_tracing_flush(**_kwargs) -> None:
    tracing_shutdown()
