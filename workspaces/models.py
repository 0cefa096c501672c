from django.db import models
from django.utils import timezone


class WorkspaceTeardown(models.Model):
    """Durable record that a workspace's teardown is owed (an outbox row).

    Written in the same transaction that deletes the project, so a crash between the
    commit and putting the teardown on the bus loses nothing: the periodic sweep finds
    the pending row and dispatches it again. The sweep also opens rows for leftovers it
    finds with no project row.
    """

    class Status(models.TextChoices):
        PENDING = "pending"
        DONE = "done"

    # No foreign key: the project row is gone by the time this row matters.
    project_id = models.UUIDField(unique=True)
    user_id = models.BigIntegerField()
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    attempts = models.PositiveIntegerField(default=0)
    last_error = models.TextField(blank=True, default="")
    # How many queued tasks the last run purged from the project's queue.
    purged_tasks = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(default=timezone.now)
    dispatched_at = models.DateTimeField(null=True, blank=True)
    last_attempt_at = models.DateTimeField(null=True, blank=True)
    completed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["status", "created_at"], name="teardown_status_created")]

    def __str__(self) -> str:
        return f"teardown of {self.project_id} ({self.status})"


class Workspace(models.Model):
    """The workspace registry lives in Redis, not in a table; this table-less model only
    gives it a page (and permissions) in the Django admin."""

    class Meta:
        managed = False
        default_permissions = ("view", "change")
        verbose_name = "workspace"
        verbose_name_plural = "workspaces"

    def __str__(self) -> str:
        return "workspace"
