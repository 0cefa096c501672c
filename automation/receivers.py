"""How automation hears of runs and deletions: a run's end (or wait) records its webhook
deliveries in the transaction that ends it; a schedule's beat row goes with the
schedule, whatever deleted it (the API, the admin, its project's or agent's cascade)."""

from __future__ import annotations

import logging

from django.db import transaction
from django.db.models.signals import post_delete
from django.dispatch import receiver
from django_celery_beat.models import PeriodicTask

from chat.signals import run_transitioned

from .models import Schedule
from .webhooks import deliveries_record

logger = logging.getLogger(__name__)


@receiver(run_transitioned, dispatch_uid="automation.run_webhooks")
def run_webhooks(sender, *, run_id, project_id, status, **fields) -> None:
    # In a savepoint: a failure here loses the deliveries (logged), never the run's end.
    try:
        with transaction.atomic():
            deliveries_record(
                project_id=project_id,
                status=status,
                data={"run_id": run_id, "project_id": project_id, "status": status, **fields},
            )
    except Exception:
        logger.exception("run %s ended %s; its webhooks were not recorded", run_id, status)


@receiver(post_delete, sender=Schedule, dispatch_uid="automation.schedule_beat_row")
def schedule_beat_row_delete(sender, instance: Schedule, **kwargs) -> None:
    if instance.periodic_task_id is not None:
        PeriodicTask.objects.filter(id=instance.periodic_task_id).delete()
