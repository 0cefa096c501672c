"""Automation's tasks: a schedule fired by beat (maintenance queue; its message's run then
goes on the project's bus like any other) and the pass that fires a lost one again, an
endpoint's drain of its webhook deliveries (the webhooks queue), the sweep of due
deliveries and the purge (beat). Thin and idempotent: ids in, one service called; a row
that is gone ends the task quietly."""

from __future__ import annotations

from celery import shared_task

from projects.idempotency import idempotency_keys_purge

from .delivery import DRAIN_TASK, endpoint_drain
from .schedules import FIRE_TASK, schedule_fire, schedules_missed_fire
from .webhooks import DELIVER_TASK, deliveries_due, delivery_kick


@shared_task(name=FIRE_TASK, ignore_result=True)
def fire_schedule(*, schedule_id: str) -> str:
    return schedule_fire(schedule_id=schedule_id)


@shared_task(name="automation.recover_schedules", ignore_result=True)
def recover_schedules() -> int:
    return schedules_missed_fire()


@shared_task(name=DRAIN_TASK, ignore_result=True)
def drain_webhooks(*, endpoint_id: str, sibling: bool = False) -> dict:
    return endpoint_drain(endpoint_id=endpoint_id, sibling=sibling)


@shared_task(name=DELIVER_TASK, ignore_result=True)
def deliver_webhook(*, delivery_id: str) -> int:
    return delivery_kick(delivery_id=delivery_id)


@shared_task(name="automation.deliveries_due", ignore_result=True)
def send_due_deliveries() -> int:
    return deliveries_due()


@shared_task(name="automation.purge", ignore_result=True)
def purge() -> dict:
    # Old webhook deliveries go with the lifecycle's retention sweep (a project may keep
    # them longer or shorter: lifecycle.retention_kinds).
    return {"idempotency_keys": idempotency_keys_purge()}
