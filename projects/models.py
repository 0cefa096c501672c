import uuid

from django.conf import settings
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models

# Bounds of a project's flow rules (agentbus.flow).
MAX_FLOW_WEIGHT = 1000
MAX_FLOW_IN_FLIGHT = 10_000


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
    # Flow control on the shared worker pool (set by operators, read-only to the owner):
    # the project's share under contention (empty: AGENTBUS_DEFAULT_WEIGHT), and the most
    # of its tasks in flight at once across all workers (0: no cap).
    flow_weight = models.PositiveSmallIntegerField(
        null=True,
        blank=True,
        validators=[MinValueValidator(1), MaxValueValidator(MAX_FLOW_WEIGHT)],
        help_text="Share of the shared workers under contention, against other projects' "
        "weights (empty: the deployment's default).",
    )
    flow_max_in_flight = models.PositiveIntegerField(
        default=0,
        validators=[MaxValueValidator(MAX_FLOW_IN_FLIGHT)],
        help_text="At most this many of the project's tasks run at once, across all "
        "workers; the rest wait in its queue (0: no cap).",
    )

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["owner", "-created_at"], name="project_owner_created")]

    def __str__(self) -> str:
        return self.name

    @property
    def effective_weight(self) -> int:
        return self.flow_weight or settings.AGENTBUS_DEFAULT_WEIGHT


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
