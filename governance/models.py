import uuid

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone

from projects.models import Project


class ProjectApiKey(models.Model):
    """A key that reaches one project, within its scopes (common.credentials). Only a
    hash of the key is stored; the key itself is shown once, when it is created."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="api_keys")
    name = models.CharField(max_length=200)
    # The key's first characters, to recognise it in lists (`uws_` and 8 more).
    prefix = models.CharField(max_length=16)
    # SHA-256 of the whole key: keys are 256 random bits, so no salt or slow hash is needed.
    key_hash = models.CharField(max_length=64, unique=True)
    scopes = models.JSONField(default=list)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["project", "-created_at"], name="apikey_project_created")]
        verbose_name = "project API key"

    def __str__(self) -> str:
        return f"{self.prefix}… ({self.name})"

    @property
    def is_active(self) -> bool:
        return self.revoked_at is None


class Quota(models.Model):
    """Limits an operator sets on one project or on one user (all of the user's
    projects together). An empty limit is no limit."""

    project = models.OneToOneField(
        Project, on_delete=models.CASCADE, null=True, blank=True, related_name="quota"
    )
    user = models.OneToOneField(
        settings.AUTH_USER_MODEL,
        on_delete=models.CASCADE,
        null=True,
        blank=True,
        related_name="quota",
    )
    tokens_per_day = models.PositiveBigIntegerField(null=True, blank=True)
    tokens_per_month = models.PositiveBigIntegerField(null=True, blank=True)
    messages_per_minute = models.PositiveIntegerField(null=True, blank=True)
    concurrent_runs = models.PositiveIntegerField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    LIMITS = ("tokens_per_day", "tokens_per_month", "messages_per_minute", "concurrent_runs")

    class Meta:
        constraints = [
            models.CheckConstraint(
                condition=Q(project__isnull=False, user__isnull=True)
                | Q(project__isnull=True, user__isnull=False),
                name="quota_project_xor_user",
            )
        ]

    def __str__(self) -> str:
        return (
            f"quota of project {self.project_id}"
            if self.project_id
            else f"quota of user {self.user_id}"
        )


class RunUsage(models.Model):
    """The accounting of one agent run (one assistant message) that called its
    provider: the tokens it reported (or an estimate), the model, the latency.

    Rows outlive their project and agent (plain ids, no foreign keys): what a user spent
    still counts against the user's quota after a project is deleted.
    """

    run_id = models.UUIDField(primary_key=True)
    project_id = models.UUIDField()
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    agent_id = models.UUIDField()
    message_id = models.BigIntegerField()
    model = models.CharField(max_length=200, blank=True, default="")
    provider = models.CharField(max_length=50, blank=True, default="")
    prompt_tokens = models.PositiveBigIntegerField(default=0)
    completion_tokens = models.PositiveBigIntegerField(default=0)
    total_tokens = models.PositiveBigIntegerField(default=0)
    # The provider did not report its usage: the counts are estimated from the text.
    estimated = models.BooleanField(default=False)
    # The tool calls the model asked for (counted, not priced).
    tool_calls = models.PositiveIntegerField(default=0)
    latency_ms = models.PositiveIntegerField(null=True, blank=True)
    outcome = models.CharField(max_length=32, blank=True, default="")
    # When the message was accepted, and its UTC day: what usage and quotas count by.
    created_at = models.DateTimeField()
    day = models.DateField()
    recorded_at = models.DateTimeField()
    # The latest dispatch attempt whose tokens are counted (each attempt once).
    recorded_attempt = models.PositiveIntegerField(default=1)

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            models.Index(fields=["project_id", "day"], name="usage_project_day"),
            models.Index(fields=["user", "day"], name="usage_user_day"),
            # The admin's usage list, newest first, in the order it asks for; its outcome
            # and provider filters list the newest rows' values from the index alone.
            models.Index(
                fields=["-created_at", "-run_id"],
                include=["outcome", "provider"],
                name="usage_created",
            ),
        ]
        verbose_name_plural = "run usage"

    def __str__(self) -> str:
        return f"run {self.run_id}: {self.total_tokens} tokens"


class ProviderSettings(models.Model):
    """A project's own LLM endpoint and model rules; empty fields fall back to the
    deployment's (OPENAI_BASE_URL, OPENAI_API_KEY, LLM_DEFAULT_MODEL). The API key is
    stored encrypted (governance.secrets) and never shown."""

    project = models.OneToOneField(Project, on_delete=models.CASCADE, related_name="provider")
    base_url = models.URLField(max_length=500, blank=True, default="")
    api_key_encrypted = models.TextField(blank=True, default="")
    default_model = models.CharField(max_length=200, blank=True, default="")
    # Models the project's agents may ask for; empty: any.
    allowed_models = models.JSONField(default=list, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name = "provider settings"
        verbose_name_plural = "provider settings"

    def __str__(self) -> str:
        return f"provider of project {self.project_id}"

    @property
    def has_api_key(self) -> bool:
        return bool(self.api_key_encrypted)


class AuditEvent(models.Model):
    """One mutation through the API or the admin: who, with which credential, what,
    when, from which address. Append-only: rows are never changed (on PostgreSQL a
    trigger refuses updates), and deleted only by the retention purge."""

    class Credential(models.TextChoices):
        TOKEN = "token"
        SESSION = "session"
        KEY = "key"
        ADMIN = "admin"

    created_at = models.DateTimeField(default=timezone.now, editable=False)
    # A plain id: the record outlives its project (operators still read it).
    project_id = models.UUIDField(null=True, blank=True)
    # Who acted stays as text (`username`) and as the id they had: no constraint and
    # nothing done on the user's deletion, since SET_NULL would be an UPDATE, which the
    # append-only trigger refuses (and the record must keep saying who it was).
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.DO_NOTHING,
        db_constraint=False,
        null=True,
        blank=True,
        related_name="+",
    )
    username = models.CharField(max_length=150, blank=True, default="")
    credential = models.CharField(max_length=16, choices=Credential.choices)
    key_prefix = models.CharField(max_length=16, blank=True, default="")
    method = models.CharField(max_length=8)
    path = models.CharField(max_length=500)
    # The route (API) or the admin action and model ("change agents.agent").
    action = models.CharField(max_length=200)
    object_repr = models.CharField(max_length=200, blank=True, default="")
    status_code = models.PositiveSmallIntegerField(null=True, blank=True)
    ip_address = models.GenericIPAddressField(null=True, blank=True)
    # The admin's own log entry this one mirrors: each is recorded once.
    admin_log_id = models.BigIntegerField(null=True, blank=True, unique=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [
            models.Index(fields=["project_id", "-created_at"], name="audit_project_created"),
            models.Index(fields=["created_at"], name="audit_created"),
        ]

    def __str__(self) -> str:
        return f"{self.created_at:%Y-%m-%d %H:%M:%S} {self.username} {self.action}"


class EmbeddingUsage(models.Model):
    """Tokens embedded to store one batch of a context ingest job. The bundled embedder
    reports none: counts are estimated from the text (`estimated`)."""

    project_id = models.UUIDField()
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    agent_id = models.UUIDField()
    job_id = models.CharField(max_length=64)
    # The job's first document in this batch: a batch delivered twice is counted once.
    batch_start = models.PositiveIntegerField()
    model = models.CharField(max_length=200, blank=True, default="")
    tokens = models.PositiveBigIntegerField(default=0)
    estimated = models.BooleanField(default=True)
    day = models.DateField()
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(fields=["job_id", "batch_start"], name="embedding_batch_once")
        ]
        indexes = [models.Index(fields=["project_id", "day"], name="embedding_project_day")]
        verbose_name_plural = "embedding usage"

    def __str__(self) -> str:
        return f"job {self.job_id} from {self.batch_start}: {self.tokens} tokens"


class UsageDaily(models.Model):
    """Usage rolled up per UTC day: what raw `RunUsage` and `EmbeddingUsage` rows become
    when retention removes them (governance.rollups), so usage reports and quotas stay
    right. Plain ids: a deleted user's rows stay as anonymised totals (`user_id` null),
    what an operator keeps for accounting."""

    day = models.DateField()
    project_id = models.UUIDField()
    user_id = models.BigIntegerField(null=True, blank=True)
    agent_id = models.UUIDField(null=True, blank=True)
    model = models.CharField(max_length=200, blank=True, default="")
    runs = models.PositiveBigIntegerField(default=0)
    estimated_runs = models.PositiveBigIntegerField(default=0)
    prompt_tokens = models.PositiveBigIntegerField(default=0)
    completion_tokens = models.PositiveBigIntegerField(default=0)
    total_tokens = models.PositiveBigIntegerField(default=0)
    tool_calls = models.PositiveBigIntegerField(default=0)
    # Sum and count of the latencies reported, so means stay exact across rollups.
    latency_ms_sum = models.PositiveBigIntegerField(default=0)
    latency_count = models.PositiveBigIntegerField(default=0)
    embedding_tokens = models.PositiveBigIntegerField(default=0)

    class Meta:
        ordering = ["-day"]
        indexes = [
            models.Index(fields=["project_id", "day"], name="usagedaily_project_day"),
            models.Index(fields=["user_id", "day"], name="usagedaily_user_day"),
        ]
        verbose_name_plural = "usage (daily rollups)"

    def __str__(self) -> str:
        return f"{self.day} {self.project_id}: {self.total_tokens} tokens"
