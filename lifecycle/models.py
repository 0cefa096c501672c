"""Retention policies and reports, and the outbox of users' erasures."""

import uuid

from django.conf import settings
from django.db import models
from django.db.models.functions import Now
from django.utils import timezone

from projects.models import Project


class RetentionPolicy(models.Model):
    """A project's own retention periods, over the deployment's (settings RETENTION_*).
    Each field in days: null follows the deployment, 0 keeps forever."""

    project = models.OneToOneField(Project, on_delete=models.CASCADE, related_name="retention")
    # Chat sessions (with their messages and runs) with no message for this long.
    sessions_days = models.PositiveIntegerField(null=True, blank=True)
    # The steps (tool calls) of runs ended this long ago; the run itself stays.
    run_steps_days = models.PositiveIntegerField(null=True, blank=True)
    # A session's event history (its Redis stream) after this long without a message.
    events_days = models.PositiveIntegerField(null=True, blank=True)
    # Raw usage rows (rolled up per day first: usage and quotas stay right).
    usage_days = models.PositiveIntegerField(null=True, blank=True)
    # What the agents remember of sessions (their exchanges in the vector store) once the
    # session has had no message for this long (or is gone).
    session_context_days = models.PositiveIntegerField(null=True, blank=True)
    # Webhook deliveries (with their attempts) made this long ago; pending ones stay.
    webhook_deliveries_days = models.PositiveIntegerField(null=True, blank=True)
    # Schedules' firings that fired this long ago; each schedule's latest stays.
    schedule_fires_days = models.PositiveIntegerField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    KINDS = ("sessions_days", "run_steps_days", "events_days", "usage_days",
             "session_context_days", "webhook_deliveries_days", "schedule_fires_days")  # fmt: skip

    class Meta:
        verbose_name_plural = "retention policies"

    def __str__(self) -> str:
        return f"retention of project {self.project_id}"


class RetentionReport(models.Model):
    """What one retention sweep removed, per kind; `complete` false when it stopped at
    its time budget (the next one goes on)."""

    started_at = models.DateTimeField(default=timezone.now)
    finished_at = models.DateTimeField(null=True, blank=True)
    removed = models.JSONField(default=dict, blank=True)
    projects = models.PositiveIntegerField(default=0)
    chunks = models.PositiveIntegerField(default=0)
    complete = models.BooleanField(default=False)

    class Meta:
        ordering = ["-started_at"]

    def __str__(self) -> str:
        return f"retention sweep {self.started_at:%Y-%m-%d %H:%M}"


class AccountErasure(models.Model):
    """Outbox of a deleted user's erasure, committed with the delete: what remains once
    the projects' teardowns are done (their records anonymised, the user's counters in
    Redis). Deleted when done, so nothing of the user stays here either."""

    user_id = models.BigIntegerField(unique=True)
    project_ids = models.JSONField(default=list)
    created_at = models.DateTimeField(default=timezone.now)
    attempts = models.PositiveIntegerField(default=0)

    def __str__(self) -> str:
        return f"erasure of user {self.user_id}"


class ArchiveJob(models.Model):
    """A project's export (its archive, a file under VAR_DIR/exports/<project id>/) or an
    import of one export into a new project of the caller's."""

    class Kind(models.TextChoices):
        EXPORT = "export"
        IMPORT = "import"

    class Status(models.TextChoices):
        QUEUED = "queued"
        RUNNING = "running"
        DONE = "done"
        ERROR = "error"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    kind = models.CharField(max_length=8, choices=Kind.choices)
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="archive_jobs"
    )
    # An export: the project exported. An import: the project it made (once made).
    project = models.ForeignKey(
        Project, on_delete=models.CASCADE, null=True, blank=True, related_name="archive_jobs"
    )
    # An import: the export it reads.
    source = models.ForeignKey(
        "self", on_delete=models.SET_NULL, null=True, blank=True, related_name="imports"
    )
    status = models.CharField(max_length=8, choices=Status.choices, default=Status.QUEUED)
    error = models.TextField(blank=True, default="")
    # Per section: how many records were written (export) or made (import).
    counts = models.JSONField(default=dict, blank=True)
    size_bytes = models.PositiveBigIntegerField(default=0)
    seconds = models.FloatField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    finished_at = models.DateTimeField(null=True, blank=True)
    # Which sending of the job's task is owed (lifecycle.recovery sends it again, under
    # the next number, when its worker died or its message was lost: a task of an older
    # one does nothing); when it was sent, and the worker that received it (blank until
    # one did). The database's defaults too: a process of the previous release, still
    # running during an upgrade, stores jobs without them.
    attempt = models.PositiveIntegerField(default=1, db_default=1)
    sent_at = models.DateTimeField(default=timezone.now, db_default=Now())
    worker = models.CharField(max_length=255, blank=True, default="", db_default="")

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            # The recovery pass's look at the jobs not ended (a few among many).
            models.Index(
                fields=["sent_at"],
                condition=models.Q(status__in=["queued", "running"]),
                name="archive_job_owed",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.kind} {self.id} ({self.status})"
