"""Schedules (messages into a session at a time or on a cron) and webhooks (run events
delivered, signed, to a project's endpoints)."""

import uuid

from django.db import models
from django_celery_beat.models import PeriodicTask

from agents.models import Agent
from chat.models import ChatSession, Message
from governance.secrets import EncryptedTextField
from projects.models import Project


class Schedule(models.Model):
    """A message an agent is sent without a person: once at `run_at`, or on every tick of
    `cron` in `timezone`. Beat fires it through its PeriodicTask (django-celery-beat's
    database scheduler); each firing is a ScheduleFire, at most one per tick."""

    class Kind(models.TextChoices):
        ONCE = "once"
        CRON = "cron"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="schedules")
    agent = models.ForeignKey(Agent, on_delete=models.CASCADE, related_name="schedules")
    # The session its messages go into (made for it unless one is given).
    session = models.ForeignKey(ChatSession, on_delete=models.CASCADE, related_name="schedules")
    name = models.CharField(max_length=200)
    content = models.TextField()
    kind = models.CharField(max_length=8, choices=Kind.choices)
    run_at = models.DateTimeField(null=True, blank=True)
    cron = models.CharField(max_length=120, blank=True, default="")
    timezone = models.CharField(max_length=64, default="UTC")
    enabled = models.BooleanField(default=True)
    # What beat reads; deleted with the schedule (automation.receivers).
    periodic_task = models.OneToOneField(
        PeriodicTask, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["project", "-created_at"], name="schedule_project")]

    def __str__(self) -> str:
        return self.name


class ScheduleFire(models.Model):
    """One firing of a schedule: the tick it answers (the minute, for cron; `run_at` for
    once) is unique, so a tick sent twice (two beats, a redelivered task) runs once."""

    class Outcome(models.TextChoices):
        SENT = "sent"
        REFUSED = "refused"  # a quota, or the session busy under busy_policy `reject`

    schedule = models.ForeignKey(Schedule, on_delete=models.CASCADE, related_name="fires")
    tick = models.DateTimeField()
    fired_at = models.DateTimeField(auto_now_add=True)
    outcome = models.CharField(max_length=16, choices=Outcome.choices)
    detail = models.TextField(blank=True, default="")
    message = models.ForeignKey(
        Message, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )

    class Meta:
        ordering = ["-tick"]
        constraints = [
            models.UniqueConstraint(fields=["schedule", "tick"], name="schedule_fire_once")
        ]

    def __str__(self) -> str:
        return f"{self.schedule_id} @ {self.tick:%Y-%m-%d %H:%M} ({self.outcome})"


class WebhookEndpoint(models.Model):
    """A URL of a project that run events are delivered to, signed with its secret
    (Standard Webhooks). After a failure the endpoint is backed off as a whole
    (`blocked_until`): its other deliveries wait instead of piling up on a dead host."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="webhooks")
    url = models.URLField(max_length=2000)
    events = models.JSONField(default=list)
    description = models.CharField(max_length=200, blank=True, default="")
    enabled = models.BooleanField(default=True)
    # `whsec_` + base64 of 32 random bytes, shown once at creation; encrypted at rest.
    secret = EncryptedTextField()
    consecutive_failures = models.PositiveIntegerField(default=0)
    blocked_until = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["project", "-created_at"], name="webhook_project")]

    def __str__(self) -> str:
        return self.url


class WebhookDelivery(models.Model):
    """One event for one endpoint: its `id` is the `webhook-id` (the same on every
    attempt, so receivers can drop repeats), `body` the exact bytes signed."""

    class Status(models.TextChoices):
        PENDING = "pending"
        DELIVERED = "delivered"
        FAILED = "failed"  # retried for WEBHOOK_RETRY_WINDOW_SECONDS, then given up

    id = models.CharField(primary_key=True, max_length=40)
    endpoint = models.ForeignKey(
        WebhookEndpoint, on_delete=models.CASCADE, related_name="deliveries"
    )
    event_type = models.CharField(max_length=40)
    body = models.TextField()
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    attempts = models.PositiveIntegerField(default=0)
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    delivered_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            # An endpoint's due deliveries, oldest first (its drain's claim, the sweep):
            # pending ones only, so a week of delivered ones and other endpoints' backlogs
            # (a dead endpoint keeps a day of them) are not in the way.
            models.Index(
                fields=["endpoint", "next_attempt_at", "created_at"],
                condition=models.Q(status="pending"),
                name="delivery_endpoint_due",
            ),
            models.Index(fields=["endpoint", "-created_at"], name="delivery_endpoint"),
        ]

    def __str__(self) -> str:
        return f"{self.id} ({self.event_type}, {self.status})"


class WebhookAttempt(models.Model):
    """One try of a delivery: what the endpoint answered, or why nothing came back."""

    delivery = models.ForeignKey(WebhookDelivery, on_delete=models.CASCADE, related_name="log")
    number = models.PositiveIntegerField()
    at = models.DateTimeField(auto_now_add=True)
    status_code = models.PositiveSmallIntegerField(null=True, blank=True)
    error = models.TextField(blank=True, default="")
    duration_ms = models.PositiveIntegerField(default=0)

    class Meta:
        ordering = ["number"]

    def __str__(self) -> str:
        return f"attempt {self.number}: {self.status_code or self.error[:40]}"
