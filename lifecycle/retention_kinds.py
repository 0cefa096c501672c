"""Retention kinds of the apps below the lifecycle, registered with
`retention.retention_kind_register` (the lifecycle sits above them: they know nothing of it).

- `session_context_days`: what agents remember of a session (its question/answer
  exchanges in the vector store) once the session has had no message for that long, or
  is gone. The sweep runs on a worker, which holds the vector store, and vacuums it
  after removing any, so their text leaves the disk.
- `webhook_deliveries_days`: webhook deliveries (with their attempts) made that long ago,
  pending ones excepted. This was automation's own 7-day purge; the deployment default
  (RETENTION_WEBHOOK_DELIVERIES_DAYS) keeps its period.
- `schedule_fires_days`: schedules' firings made that long ago, each schedule's latest
  excepted: the tick it answered is where the recovery pass of missed ticks counts from.
"""

from __future__ import annotations

from datetime import datetime

from django.conf import settings
from django.db import transaction
from django.db.models import OuterRef, Subquery

from agents.models import Agent
from automation.models import ScheduleFire, WebhookDelivery
from chat.models import Message
from context.vectors import context_vacuum, exchange_points_forget, exchanges_before
from projects.models import Project

from .retention import retention_kind_register

# Exchanges whose sessions one query looks up.
SESSION_LOOKUP = 256


def _sessions_active(session_ids: set[str], cutoff: datetime) -> set[str]:
    """Those of `session_ids` with a message since `cutoff` (their context stays)."""
    ids = [s for s in session_ids if s]
    if not ids:
        return set()
    active = (
        Message.objects.filter(session_id__in=ids, created_at__gte=cutoff)
        .values_list("session_id", flat=True)
        .distinct()
    )
    return {str(s) for s in active}


def _due(batch: list[tuple[str, str | None]], cutoff: datetime) -> list[str]:
    active = _sessions_active({s for _, s in batch if s}, cutoff)
    return [point for point, session in batch if session not in active]


def _remove_session_context(project: Project, cutoff: datetime, limit: int) -> int:
    """At most `limit` remembered exchanges, stored before `cutoff`, of sessions with no
    message since (or gone), from the first of the project's agents that has any."""
    before = cutoff.timestamp()
    agents = Agent.objects.filter(project=project).order_by("id").values_list("id", flat=True)
    for agent_id in agents:
        scope = {"user_id": project.owner_id, "project_id": project.id, "agent_id": str(agent_id)}
        due: list[str] = []
        batch: list[tuple[str, str | None]] = []
        for entry in exchanges_before(**scope, before=before):
            batch.append(entry)
            if len(batch) >= SESSION_LOOKUP:
                due += _due(batch, cutoff)
                batch = []
                if len(due) >= limit:
                    break
        if batch:
            due += _due(batch, cutoff)
        if due:
            due = due[:limit]
            exchange_points_forget(**scope, ids=due)
            return len(due)
    return 0


def _remove_webhook_deliveries(project: Project, cutoff: datetime, limit: int) -> int:
    ids = list(
        WebhookDelivery.objects.filter(endpoint__project=project, created_at__lt=cutoff)
        .exclude(status=WebhookDelivery.Status.PENDING)
        .order_by("created_at")
        .values_list("id", flat=True)[:limit]
    )
    if not ids:
        return 0
    with transaction.atomic():  # their attempts go with them (the cascade)
        _total, per_model = WebhookDelivery.objects.filter(id__in=ids).delete()
    return per_model.get(WebhookDelivery._meta.label, 0)


def _remove_schedule_fires(project: Project, cutoff: datetime, limit: int) -> int:
    latest = (
        ScheduleFire.objects.filter(schedule=OuterRef("schedule"))
        .order_by("-tick")
        .values("id")[:1]
    )
    ids = list(
        ScheduleFire.objects.filter(schedule__project=project, fired_at__lt=cutoff)
        .exclude(id=Subquery(latest))
        .order_by("fired_at")
        .values_list("id", flat=True)[:limit]
    )
    return ScheduleFire.objects.filter(id__in=ids).delete()[0] if ids else 0


retention_kind_register(
    "session_context_days",
    default=lambda: settings.RETENTION_SESSION_CONTEXT_DAYS,
    remove=_remove_session_context,
    # Removed exchanges leave the disk too, not only the index (the embedded store keeps
    # deleted points' text until vacuumed).
    finish=context_vacuum,
)
retention_kind_register(
    "webhook_deliveries_days",
    default=lambda: settings.RETENTION_WEBHOOK_DELIVERIES_DAYS,
    remove=_remove_webhook_deliveries,
)
retention_kind_register(
    "schedule_fires_days",
    default=lambda: settings.RETENTION_SCHEDULE_FIRES_DAYS,
    remove=_remove_schedule_fires,
)
