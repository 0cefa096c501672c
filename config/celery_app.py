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

from celery import Celery
from celery.signals import worker_init
from django.core.exceptions import ImproperlyConfigured

from agentbus.celeryconf import configure_celery
from governance.secrets import fernet_keys_required_valid

# Production unless told otherwise: `make run` and the tests name theirs.
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.production")

app = Celery("config")
app.config_from_object("django.conf:settings", namespace="CELERY")
configure_celery(app)
app.autodiscover_tasks()


@worker_init.connect
def _refuse_a_bad_fernet_key(**kwargs) -> None:
    # As the web entry points do: a worker with a missing or malformed key would start,
    # then fail every run of a project that has a provider key or tool secret.
    try:
        fernet_keys_required_valid()
    except ImproperlyConfigured as exc:
        # Celery logs and ignores a handler's exception; a SystemExit stops the worker.
        raise SystemExit(f"ImproperlyConfigured: {exc}") from None
