"""Reads of schedules and webhooks, scoped to the project the view resolved (another
user's object is a 404 because it is not in that project)."""

from __future__ import annotations

import uuid

from django.db.models import QuerySet
from django.http import Http404

from projects.models import Project

from .models import Schedule, ScheduleFire, WebhookDelivery, WebhookEndpoint


def schedule_list(*, project: Project) -> QuerySet[Schedule]:
    return Schedule.objects.filter(project=project)


def schedule_get(*, project: Project, schedule_id: uuid.UUID) -> Schedule:
    schedule = schedule_list(project=project).filter(id=schedule_id).first()
    if schedule is None:
        raise Http404("No such schedule.")
    return schedule


def schedule_fire_list(*, schedule: Schedule) -> QuerySet[ScheduleFire]:
    return ScheduleFire.objects.filter(schedule=schedule)


def webhook_list(*, project: Project) -> QuerySet[WebhookEndpoint]:
    return WebhookEndpoint.objects.filter(project=project)


def webhook_get(*, project: Project, webhook_id: uuid.UUID) -> WebhookEndpoint:
    endpoint = webhook_list(project=project).filter(id=webhook_id).first()
    if endpoint is None:
        raise Http404("No such webhook.")
    return endpoint


def delivery_list(*, endpoint: WebhookEndpoint) -> QuerySet[WebhookDelivery]:
    return WebhookDelivery.objects.filter(endpoint=endpoint).prefetch_related("log")


def delivery_get(*, endpoint: WebhookEndpoint, delivery_id: str) -> WebhookDelivery:
    delivery = delivery_list(endpoint=endpoint).filter(id=delivery_id).first()
    if delivery is None:
        raise Http404("No such delivery.")
    return delivery
