"""Webhooks: a project's endpoints get its runs' events (`run.completed`, `run.failed`,
`run.cancelled`, `run.waiting`), signed per the Standard Webhooks spec.

- Recorded with the run's end: the receiver of `chat.signals.run_transitioned` writes one
  WebhookDelivery per subscribed endpoint in the transaction that ends the run (an outbox:
  an ended run never lacks its deliveries), due at once, and kicks each endpoint after
  commit. Nothing is sent from the run itself.
- Sent by the webhooks worker (its own queue and threads), an endpoint's due deliveries
  drained in batches on its kept-alive connection, through the egress guard (purpose
  `webhooks`) with short timeouts and no redirects (automation.delivery).
- Retried with backoff: after a failure the *endpoint* waits WEBHOOK_BACKOFF_SECONDS
  (growing with its failures in a row); its deliveries wait for it and one probe at a
  time tests it, so a dead endpoint costs one attempt per backoff step, not one per
  event, and never holds the threads other endpoints' deliveries need. A delivery older
  than WEBHOOK_RETRY_WINDOW_SECONDS (a day) is given up (`failed`). The sweep (beat)
  kicks endpoints whose deliveries are due again.
- Every attempt is logged (WebhookAttempt); the owner reads the log and replays a
  delivery (same `webhook-id`, so a receiver that got it can tell).
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
import uuid
from datetime import datetime

from django.db import transaction
from django.db.models import Exists, OuterRef, Q
from django.http import Http404
from django.utils import timezone

from common.egress import WEBHOOKS, EgressRefused, check_url
from common.services import on_commit_robust
from projects.models import Project
from projects.services import project_lock_for_write

from .delivery import endpoints_kick, kick_reset, signature_headers
from .models import WebhookDelivery, WebhookEndpoint

logger = logging.getLogger(__name__)

# Queued by earlier versions (one task per delivery); now it kicks the endpoint.
DELIVER_TASK = "automation.deliver_webhook"
# A run's status -> the event its endpoints subscribe to.
EVENTS = {
    "done": "run.completed",
    "error": "run.failed",
    "cancelled": "run.cancelled",
    "waiting": "run.waiting",
}
EVENT_TYPES = tuple(EVENTS.values())
SECRET_PREFIX = "whsec_"
# A delivery's id (its `webhook-id`): "msg_" and a UUID's 32 hex digits.
DELIVERY_ID_PATTERN = r"^msg_[0-9a-f]{32}$"

__all__ = ["signature_headers"]


class WebhookUrlRefused(ValueError):
    """The URL may not be reached for webhooks; str() says why."""


def secret_new() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def url_valid(url: str) -> str:
    """A URL the guard lets through now (resolved and checked); raises WebhookUrlRefused.
    Checked again at every attempt (DNS may change)."""
    try:
        check_url(url, purpose=WEBHOOKS)
    except EgressRefused as exc:
        raise WebhookUrlRefused(str(exc)) from None
    return url


# --- Endpoints --------------------------------------------------------------------------


def webhook_create(
    *, project: Project, url: str, events: list[str], description: str = ""
) -> WebhookEndpoint:
    """A new endpoint with a fresh secret (the caller shows it once)."""
    url = url_valid(url)
    with transaction.atomic():
        project_lock_for_write(project_id=project.id)  # a 404 if a delete came first
        return WebhookEndpoint.objects.create(
            project=project,
            url=url,
            events=sorted(set(events)),
            description=description,
            secret=secret_new(),
        )


def _endpoint_locked(endpoint: WebhookEndpoint) -> None:
    """Hold the endpoint's row until commit (inside a transaction); a 404 if it was
    deleted meanwhile."""
    if not WebhookEndpoint.objects.select_for_update().filter(id=endpoint.id).exists():
        raise Http404("No such webhook endpoint.")


def webhook_update(*, endpoint: WebhookEndpoint, data: dict) -> WebhookEndpoint:
    fields = [f for f in ("url", "events", "description", "enabled") if f in data]
    if "url" in data:
        url_valid(data["url"])
    if "events" in data:
        data = {**data, "events": sorted(set(data["events"]))}
    for field in fields:
        setattr(endpoint, field, data[field])
    if "enabled" in data and data["enabled"]:
        # Switched (back) on: its backoff starts over.
        endpoint.consecutive_failures, endpoint.blocked_until = 0, None
        fields += ["consecutive_failures", "blocked_until"]
    if fields:
        with transaction.atomic():
            _endpoint_locked(endpoint)
            endpoint.save(update_fields=fields)
    if data.get("enabled"):
        project = endpoint.project
        kick_reset(owner_id=project.owner_id, project_id=project.id, endpoint_id=endpoint.id)
    return endpoint


def webhook_delete(*, endpoint: WebhookEndpoint) -> None:
    """Delete an endpoint and its delivery log; a delivery in flight finds it gone."""
    WebhookEndpoint.objects.filter(id=endpoint.id).delete()


def webhook_secret_rotate(*, endpoint: WebhookEndpoint) -> WebhookEndpoint:
    endpoint.secret = secret_new()
    with transaction.atomic():
        _endpoint_locked(endpoint)
        endpoint.save(update_fields=["secret"])
    return endpoint


# --- Recording (inside the run's end) --------------------------------------------------


def deliveries_record(
    *, project_id, status: str, data: dict, at: datetime | None = None
) -> list[str]:
    """Record (inside the caller's transaction) the event of a run that reached
    `status` for every enabled endpoint of the project subscribed to it; dispatched
    after commit. Returns the delivery ids."""
    event_type = EVENTS.get(status)
    if event_type is None:
        return []
    endpoints = [
        (owner_id, project_id, endpoint_id)
        for endpoint_id, events, owner_id in WebhookEndpoint.objects.filter(
            project_id=project_id, enabled=True
        ).values_list("id", "events", "project__owner_id")
        if event_type in events
    ]
    if not endpoints:
        return []
    at = at or timezone.now()
    body = json.dumps(
        {"type": event_type, "timestamp": at.isoformat(), "data": data},
        separators=(",", ":"),
        default=str,
    )
    deliveries = WebhookDelivery.objects.bulk_create(
        [
            WebhookDelivery(
                id=f"msg_{uuid.uuid4().hex}",
                endpoint_id=endpoint[2],
                event_type=event_type,
                body=body,
                next_attempt_at=at,
            )
            for endpoint in endpoints
        ]
    )
    on_commit_robust(lambda: endpoints_kick(endpoints), name=f"endpoints_kick({event_type})")
    return [d.id for d in deliveries]


def deliveries_due() -> int:
    """Beat: kick the endpoints (not backing off) that have deliveries due (retries, and
    any whose kick was lost between commit and queue); returns how many were kicked."""
    now = timezone.now()
    due = WebhookDelivery.objects.filter(
        endpoint=OuterRef("pk"), status=WebhookDelivery.Status.PENDING, next_attempt_at__lte=now
    )
    endpoints = list(
        WebhookEndpoint.objects.filter(
            Q(blocked_until__isnull=True) | Q(blocked_until__lte=now), Exists(due), enabled=True
        ).values_list("project__owner_id", "project_id", "id")
    )
    endpoints_kick(endpoints)
    return len(endpoints)


@transaction.atomic
def delivery_replay(*, delivery: WebhookDelivery) -> WebhookDelivery:
    """Send a delivery again now (same `webhook-id` and body), whatever its status; its
    endpoint's backoff is lifted, as the owner asks for an attempt now."""
    WebhookDelivery.objects.filter(id=delivery.id).update(
        status=WebhookDelivery.Status.PENDING,
        next_attempt_at=timezone.now(),
        created_at=timezone.now(),  # its retry window starts over
        delivered_at=None,
    )
    WebhookEndpoint.objects.filter(id=delivery.endpoint_id).update(blocked_until=None)
    project = delivery.endpoint.project
    target = (project.owner_id, project.id, delivery.endpoint_id)

    def kick() -> None:
        kick_reset(owner_id=target[0], project_id=target[1], endpoint_id=target[2])
        endpoints_kick([target])

    on_commit_robust(kick, name=f"delivery_replay({delivery.id})")
    delivery.refresh_from_db()
    return delivery


def delivery_kick(*, delivery_id: str) -> int:
    """A delivery's endpoint kicked (the task of earlier versions, still on a queue)."""
    endpoint = (
        WebhookEndpoint.objects.filter(deliveries__id=delivery_id)
        .values_list("project__owner_id", "project_id", "id")
        .first()
    )
    return endpoints_kick([endpoint]) if endpoint else 0
