"""What the dashboards draw: a project's (or the deployment's) rollup rows over the last
hours, one row per minute (missing minutes filled), in one indexed query."""

from __future__ import annotations

import uuid
from datetime import timedelta

from django.utils import timezone

from .models import DEPLOYMENT, MinuteRollup

SERIES = (
    "runs", "errors", "prompt_tokens", "completion_tokens", "ttft_p50_ms", "ttft_p95_ms",
    "queue_wait_p50_ms", "queue_wait_p95_ms", "queue_depth", "runs_in_flight", "workers_live",
)  # fmt: skip
# Counts are 0 in a minute without a row; measures and samples are unknown (a gap).
ZERO_WHEN_MISSING = {"runs", "errors", "prompt_tokens", "completion_tokens"}


def dashboard_series(*, project_id: uuid.UUID | None = None, hours: int = 6) -> dict:
    """{"labels": ["HH:MM", ...], "<series>": [...], "totals": {...}} for the last
    `hours` (the deployment's when `project_id` is None)."""
    end = timezone.now().replace(second=0, microsecond=0)
    start = end - timedelta(hours=hours)
    rows = {
        row["minute"]: row
        for row in MinuteRollup.objects.filter(
            project_id=project_id or DEPLOYMENT, minute__gte=start, minute__lt=end
        ).values("minute", *SERIES)
    }
    minutes = [start + timedelta(minutes=i) for i in range(hours * 60)]
    out: dict = {"labels": [m.strftime("%H:%M") for m in minutes]}
    for name in SERIES:
        default = 0 if name in ZERO_WHEN_MISSING else None
        out[name] = [rows[m][name] if m in rows else default for m in minutes]
    out["totals"] = {name: sum(out[name]) for name in ZERO_WHEN_MISSING}
    out["rolled_minutes"] = len(rows)
    return out
