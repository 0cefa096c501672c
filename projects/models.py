import uuid

from django.conf import settings
from django.db import models


class Project(models.Model):
    """A user's project: the unit of isolation. Each one gets its own workspace."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="projects"
    )
    name = models.CharField(max_length=200)
    description = models.TextField(blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["owner", "-created_at"], name="project_owner_created")]

    def __str__(self) -> str:
        return self.name


class IdempotencyKey(models.Model):
    """A client's `Idempotency-Key` on a POST that creates work (projects.idempotency):
    the first request with a key claims this row (the unique constraint makes the claim
    atomic across processes), does its work and stores its response in the same
    transaction as that work; a retry with the same key and body answers the stored
    response. Kept IDEMPOTENCY_KEY_TTL_SECONDS (a day), then purged; deleted with the
    project."""

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="idempotency_keys"
    )
    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="+")
    key = models.CharField(max_length=255)
    # sha256 of the method, the path and the canonical body: another request under the
    # same key is a 422.
    fingerprint = models.CharField(max_length=64)
    claimed_at = models.DateTimeField()
    # Empty until the first request's work committed with its answer.
    response_status = models.PositiveSmallIntegerField(null=True, blank=True)
    response_body = models.JSONField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["user", "project", "key"], name="idempotency_key_unique"
            )
        ]
        indexes = [models.Index(fields=["created_at"], name="idempotency_created")]

    def __str__(self) -> str:
        return self.key
