"""Per-minute rollups the dashboards draw: written by a periodic task from the runs
that ended in each minute (observability.rollup), read a few hundred rows at a time, so
a dashboard never scans the runs."""

import uuid

from django.db import models

# The rows of the whole deployment (every project together) carry this project id.
DEPLOYMENT = uuid.UUID(int=0)


class MinuteRollup(models.Model):
    minute = models.DateTimeField()  # the minute's start (UTC)
    project_id = models.UUIDField()  # DEPLOYMENT for the whole deployment
    runs = models.PositiveIntegerField(default=0)  # runs that ended in the minute
    errors = models.PositiveIntegerField(default=0)
    prompt_tokens = models.PositiveBigIntegerField(default=0)
    completion_tokens = models.PositiveBigIntegerField(default=0)
    # Of the minute's runs: time to first token, and time from accepted to started.
    ttft_p50_ms = models.PositiveIntegerField(null=True)
    ttft_p95_ms = models.PositiveIntegerField(null=True)
    queue_wait_p50_ms = models.PositiveIntegerField(null=True)
    queue_wait_p95_ms = models.PositiveIntegerField(null=True)
    # Sampled when the minute was rolled up: tasks on the queue(s), runs in flight,
    # live workers (deployment rows only).
    queue_depth = models.PositiveIntegerField(null=True)
    runs_in_flight = models.PositiveIntegerField(null=True)
    workers_live = models.PositiveIntegerField(null=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["project_id", "minute"], name="rollup_project_minute")
        ]
        indexes = [models.Index(fields=["minute"], name="rollup_minute")]  # the purge

    def __str__(self) -> str:
        return f"{self.project_id} @ {self.minute:%Y-%m-%d %H:%M}"
