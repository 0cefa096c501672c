"""Webhooks: a project's endpoints get its runs' events (`run.completed`, `run.failed`,
`run.cancelled`, `run.waiting`), signed per the Standard Webhooks spec.

- Recorded with the run's end: the receiver of `chat.signals.run_transitioned` writes one
  WebhookDelivery per subscribed endpoint in the transaction that ends the run (an outbox:
  an ended run never lacks its deliveries), and puts each on the webhooks queue after
  commit. Nothing is sent from the run itself.
- Sent by the webhooks worker (its own queue and threads), one delivery per task, through
  the egress guard (purpose `webhooks`) with short timeouts and no redirects.
- Retried with backoff: after a failure the *endpoint* waits WEBHOOK_BACKOFF_SECONDS
  (growing with its failures in a row); its deliveries wait for it and one probe at a
  time tests it, so a dead endpoint costs one attempt per backoff step, not one per
  event, and never holds the threads other endpoints' deliveries need. A delivery older
  than WEBHOOK_RETRY_WINDOW_SECONDS (a day) is given up (`failed`).
- Every attempt is logged (WebhookAttempt); the owner reads the log and replays a
  delivery (same `webhook-id`, so a receiver that got it can tell).
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta

import httpx
from celery import current_app
from django.conf import settings
from django.db import connection, transaction
from django.db.models import F, Q
from django.utils import timezone
from standardwebhooks.webhooks import Webhook

from agentbus import WEBHOOK_QUEUE
from common.egress import WEBHOOKS, EgressRefused, check_url, guarded_client
from common.services import on_commit_robust
from projects.models import Project
from workspaces.redis import scoped

from .models import WebhookAttempt, WebhookDelivery, WebhookEndpoint

logger = logging.getLogger(__name__)

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
# A delivery put on the queue at once is left alone by the sweep this long.
DISPATCH_GRACE_SECONDS = 30
# The slot of an endpoint's probe: longer than an attempt can take.
PROBE_LEASE_SECONDS = 60
# A delivery whose endpoint has all its attempt slots taken waits this long, then for the
# sweep (WEBHOOK_SWEEP_SECONDS).
BUSY_RETRY_SECONDS = 1


class WebhookUrlRefused(ValueError):
    """The URL may not be reached for webhooks; str() says why."""


def secret_new() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def signature_headers(*, secret: str, msg_id: str, body: str, at: datetime) -> dict[str, str]:
    """The Standard Webhooks headers of `body` (the standardwebhooks package signs:
    `v1,` + base64 HMAC-SHA256 of `id.timestamp.body` under the secret's bytes)."""
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": Webhook(secret).sign(msg_id=msg_id, timestamp=at, data=body),
    }


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
    return WebhookEndpoint.objects.create(
        project=project,
        url=url_valid(url),
        events=sorted(set(events)),
        description=description,
        secret=secret_new(),
    )


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
        endpoint.save(update_fields=fields)
    return endpoint


def webhook_delete(*, endpoint: WebhookEndpoint) -> None:
    """Delete an endpoint and its delivery log; a delivery in flight finds it gone."""
    WebhookEndpoint.objects.filter(id=endpoint.id).delete()


def webhook_secret_rotate(*, endpoint: WebhookEndpoint) -> WebhookEndpoint:
    endpoint.secret = secret_new()
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
        e
        for e in WebhookEndpoint.objects.filter(project_id=project_id, enabled=True).only(
            "id", "events"
        )
        if event_type in e.events
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
                endpoint_id=endpoint.id,
                event_type=event_type,
                body=body,
                next_attempt_at=at + timedelta(seconds=DISPATCH_GRACE_SECONDS),
            )
            for endpoint in endpoints
        ]
    )
    ids = [d.id for d in deliveries]
    on_commit_robust(lambda: deliveries_dispatch(ids), name=f"deliveries_dispatch({event_type})")
    return ids


def deliveries_dispatch(ids: list[str]) -> None:
    """Put deliveries on the webhooks queue (a lost one is sent by the sweep)."""
    for delivery_id in ids:
        # By name: the task module (automation.tasks) imports this one.
        current_app.send_task(
            DELIVER_TASK, kwargs={"delivery_id": delivery_id}, queue=WEBHOOK_QUEUE
        )


# --- Sending (the webhooks worker) ------------------------------------------------------


def _backoff(failures: int) -> float:
    steps = settings.WEBHOOK_BACKOFF_SECONDS
    return steps[min(max(failures, 1), len(steps)) - 1]


def _defer(delivery: WebhookDelivery, until: datetime) -> str:
    WebhookDelivery.objects.filter(id=delivery.id, status=WebhookDelivery.Status.PENDING).update(
        next_attempt_at=until
    )
    return "deferred"


def delivery_attempt(*, delivery_id: str) -> str:
    """One attempt of a delivery: `delivered`, `retry` (failed; sent again after its
    endpoint's backoff), `failed` (failed, and past the retry window), `deferred` (its
    endpoint is backing off, or another delivery probes it), `busy` (its endpoint has
    WEBHOOK_ENDPOINT_CONCURRENCY attempts in flight: the sweep sends it again) or `skipped`
    (not pending, or its endpoint is gone or off)."""
    delivery = (
        WebhookDelivery.objects.select_related("endpoint__project")
        .filter(id=delivery_id, status=WebhookDelivery.Status.PENDING)
        .first()
    )
    if delivery is None or not delivery.endpoint.enabled:
        return "skipped"
    endpoint = delivery.endpoint
    now = timezone.now()
    if endpoint.blocked_until is not None and endpoint.blocked_until > now:
        return _defer(delivery, endpoint.blocked_until)
    if endpoint.consecutive_failures:
        # A failing endpoint is probed by one delivery at a time: claim the probe slot.
        claimed = WebhookEndpoint.objects.filter(
            Q(blocked_until__isnull=True) | Q(blocked_until__lte=now), id=endpoint.id
        ).update(blocked_until=now + timedelta(seconds=PROBE_LEASE_SECONDS))
        if not claimed:
            return _defer(delivery, now + timedelta(seconds=_backoff(1)))
    # At most WEBHOOK_ENDPOINT_CONCURRENCY attempts per endpoint at once: an endpoint that
    # starts hanging holds that many of the worker's threads until its first timeout
    # backs it off, never all of them.
    redis = scoped(endpoint.project.owner_id, endpoint.project_id)
    slot = f"webhooks:inflight:{endpoint.id}"
    if redis.incr(slot) > settings.WEBHOOK_ENDPOINT_CONCURRENCY:
        redis.decr(slot)
        # For the sweep (not a task bounced at once: a backlog would spin on it).
        _defer(delivery, now + timedelta(seconds=BUSY_RETRY_SECONDS))
        return "busy"
    try:
        redis.expire(slot, int(settings.WEBHOOK_TIMEOUT_SECONDS * 2 + 10))
        # Claim this attempt (a second copy of the task finds the count moved and stops).
        attempt = delivery.attempts + 1
        if not WebhookDelivery.objects.filter(
            id=delivery.id, status=WebhookDelivery.Status.PENDING, attempts=delivery.attempts
        ).update(attempts=attempt, next_attempt_at=now + timedelta(seconds=PROBE_LEASE_SECONDS)):
            return "skipped"
        # The pooled database connection goes back while the endpoint is waited on: held,
        # a hanging endpoint's attempts would take every connection of the process's pool
        # and stall the deliveries to every other endpoint.
        connection.close()
        status_code, error, duration_ms = _send(endpoint=endpoint, delivery=delivery)
    finally:
        redis.decr(slot)
    ok = status_code is not None and 200 <= status_code < 300
    WebhookAttempt.objects.create(
        delivery_id=delivery.id,
        number=attempt,
        status_code=status_code,
        error=error[:2000],
        duration_ms=duration_ms,
    )
    if ok:
        WebhookDelivery.objects.filter(id=delivery.id).update(
            status=WebhookDelivery.Status.DELIVERED, delivered_at=timezone.now()
        )
        if endpoint.consecutive_failures or endpoint.blocked_until:
            WebhookEndpoint.objects.filter(id=endpoint.id).update(
                consecutive_failures=0, blocked_until=None
            )
        return "delivered"
    failures = endpoint.consecutive_failures + 1
    blocked_until = timezone.now() + timedelta(seconds=_backoff(failures))
    WebhookEndpoint.objects.filter(id=endpoint.id).update(
        consecutive_failures=F("consecutive_failures") + 1, blocked_until=blocked_until
    )
    window = timedelta(seconds=settings.WEBHOOK_RETRY_WINDOW_SECONDS)
    if delivery.created_at + window <= blocked_until:
        WebhookDelivery.objects.filter(id=delivery.id).update(
            status=WebhookDelivery.Status.FAILED, next_attempt_at=None
        )
        return "failed"
    WebhookDelivery.objects.filter(id=delivery.id).update(next_attempt_at=blocked_until)
    return "retry"


_clients = threading.local()


def _client() -> httpx.Client:
    """This thread's guarded client: building one (its TLS context, its pool) costs more
    than a delivery, and the guard checks and pins every request whichever client sends
    it. Kept connections are per checked address."""
    client = getattr(_clients, "client", None)
    if client is None:
        client = _clients.client = guarded_client(purpose=WEBHOOKS)
    return client


def _send(*, endpoint: WebhookEndpoint, delivery: WebhookDelivery) -> tuple[int | None, str, int]:
    """(status code or None, error, milliseconds) of one POST of the delivery."""
    headers = {
        "content-type": "application/json",
        "user-agent": "uws-webhooks/1",
        **signature_headers(
            secret=endpoint.secret,
            msg_id=delivery.id,
            body=delivery.body,
            at=datetime.now(UTC),
        ),
    }
    timeout = httpx.Timeout(
        settings.WEBHOOK_TIMEOUT_SECONDS, connect=settings.WEBHOOK_CONNECT_TIMEOUT_SECONDS
    )
    started = time.monotonic()
    try:
        response = _client().post(
            endpoint.url, content=delivery.body.encode(), headers=headers, timeout=timeout
        )
        error = "" if response.is_success else f"HTTP {response.status_code}"
        return response.status_code, error, int((time.monotonic() - started) * 1000)
    except httpx.HTTPError as exc:
        reason = exc.__cause__ if isinstance(exc.__cause__, EgressRefused) else exc
        error = f"{type(exc).__name__}: {reason}" if str(reason) else type(exc).__name__
        return None, error, int((time.monotonic() - started) * 1000)


def deliveries_due(*, limit: int = 1000) -> int:
    """Beat: put on the queue the pending deliveries whose time came (retries, and any
    lost between commit and queue); returns how many."""
    now = timezone.now()
    ids = list(
        WebhookDelivery.objects.filter(
            status=WebhookDelivery.Status.PENDING, next_attempt_at__lte=now
        )
        .order_by("next_attempt_at")
        .values_list("id", flat=True)[:limit]
    )
    if ids:
        # Left alone by the next sweeps while the tasks are on their way.
        WebhookDelivery.objects.filter(id__in=ids, next_attempt_at__lte=now).update(
            next_attempt_at=now + timedelta(seconds=DISPATCH_GRACE_SECONDS)
        )
        deliveries_dispatch(ids)
    return len(ids)


@transaction.atomic
def delivery_replay(*, delivery: WebhookDelivery) -> WebhookDelivery:
    """Send a delivery again now (same `webhook-id` and body), whatever its status; its
    endpoint's backoff is lifted, as the owner asks for an attempt now."""
    WebhookDelivery.objects.filter(id=delivery.id).update(
        status=WebhookDelivery.Status.PENDING,
        next_attempt_at=timezone.now() + timedelta(seconds=DISPATCH_GRACE_SECONDS),
        created_at=timezone.now(),  # its retry window starts over
        delivered_at=None,
    )
    WebhookEndpoint.objects.filter(id=delivery.endpoint_id).update(blocked_until=None)
    on_commit_robust(
        lambda: deliveries_dispatch([delivery.id]), name=f"delivery_replay({delivery.id})"
    )
    delivery.refresh_from_db()
    return delivery
