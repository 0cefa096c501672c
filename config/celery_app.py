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

from agentbus.celeryconf import configure_celery

# Production unless told otherwise: `make run` and the tests name theirs.
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.production")

app = Celery("config")
app.config_from_object("django.conf:settings", namespace="CELERY")
configure_celery(app)
app.autodiscover_tasks()
