"""Rolling runs up per minute (the periodic task `observability.rollup`): counts,
tokens, time-to-first-token and queue-wait percentiles of the runs that ended in each
closed minute, per project and for the whole deployment, plus gauges sampled at the
time (queue depth, runs in flight, live workers). Idempotent: each pass recomputes the
last few closed minutes, so a run that ended late in its minute is counted."""

from __future__ import annotations

import uuid
from collections import defaultdict
from datetime import datetime, timedelta

from django.conf import settings
from django.db.models import Count
from django.utils import timezone

from agentbus import live_workers, queue_depths
from agentbus.active import active_queues
from agentbus.queues import project_id_from_queue
from chat.models import Run
from governance.models import RunUsage

from .models import DEPLOYMENT, MinuteRollup

COUNTS = (
    "runs", "errors", "prompt_tokens", "completion_tokens", "ttft_p50_ms", "ttft_p95_ms",
    "queue_wait_p50_ms", "queue_wait_p95_ms",
)  # fmt: skip
GAUGES = ("queue_depth", "runs_in_flight", "workers_live")


def percentile(values: list[float], q: float) -> int | None:
    """Nearest-rank percentile `q` (0-100) of `values`, in whole units; None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil
    return int(round(ordered[int(rank) - 1]))


def _ms(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return max(0.0, (end - start).total_seconds() * 1000)


class _Minute:
    __slots__ = ("runs", "errors", "prompt", "completion", "ttft", "wait")

    def __init__(self) -> None:
        self.runs = self.errors = self.prompt = self.completion = 0
        self.ttft: list[float] = []
        self.wait: list[float] = []

    def add(self, *, error: bool, prompt: int, completion: int, ttft, wait) -> None:
        self.runs += 1
        self.errors += int(error)
        self.prompt += prompt
        self.completion += completion
        if ttft is not None:
            self.ttft.append(ttft)
        if wait is not None:
            self.wait.append(wait)

    def fields(self) -> dict[str, int | None]:
        return {
            "runs": self.runs,
            "errors": self.errors,
            "prompt_tokens": self.prompt,
            "completion_tokens": self.completion,
            "ttft_p50_ms": percentile(self.ttft, 50),
            "ttft_p95_ms": percentile(self.ttft, 95),
            "queue_wait_p50_ms": percentile(self.wait, 50),
            "queue_wait_p95_ms": percentile(self.wait, 95),
        }


def _gauges() -> dict[uuid.UUID, dict[str, int]]:
    """Queue depth per active project queue and runs in flight per project, now; the
    deployment's totals and its live workers under DEPLOYMENT."""
    gauges: dict[uuid.UUID, dict[str, int]] = defaultdict(lambda: dict.fromkeys(GAUGES, 0))
    projects = [p for p in map(project_id_from_queue, active_queues()) if p is not None]
    for project, depth in zip(projects, queue_depths(projects) if projects else [], strict=True):
        if isinstance(depth, int):
            gauges[project]["queue_depth"] = depth
    in_flight = (
        Run.objects.filter(status=Run.Status.RUNNING)
        .values("session__project_id")
        .annotate(n=Count("id"))
        .order_by()
    )
    for row in in_flight:
        gauges[row["session__project_id"]]["runs_in_flight"] = row["n"]
    total = gauges[DEPLOYMENT]
    for project, values in list(gauges.items()):
        if project != DEPLOYMENT:
            total["queue_depth"] += values["queue_depth"]
            total["runs_in_flight"] += values["runs_in_flight"]
    total["workers_live"] = len(live_workers())
    return gauges


def rollup_minutes(*, now: datetime | None = None, minutes: int = 3) -> int:
    """Roll up the `minutes` closed minutes before `now`; returns the rows written."""
    now = now or timezone.now()
    end = now.replace(second=0, microsecond=0)
    start = end - timedelta(minutes=minutes)
    runs = list(
        Run.objects.filter(finished_at__gte=start, finished_at__lt=end).values_list(
            "id",
            "session__project_id",
            "status",
            "created_at",
            "started_at",
            "first_token_at",
            "finished_at",
        )  # fmt: skip
    )
    tokens: dict[uuid.UUID, tuple[int, int]] = {}
    ids = [r[0] for r in runs]
    for i in range(0, len(ids), 1000):
        for run_id, prompt, completion in RunUsage.objects.filter(
            run_id__in=ids[i : i + 1000]
        ).values_list("run_id", "prompt_tokens", "completion_tokens"):
            tokens[run_id] = (prompt, completion)
    cells: dict[tuple[datetime, uuid.UUID], _Minute] = defaultdict(_Minute)
    for run_id, project, status, created, started, first_token, finished in runs:
        minute = finished.replace(second=0, microsecond=0)
        prompt, completion = tokens.get(run_id, (0, 0))
        values = {
            "error": status == Run.Status.ERROR,
            "prompt": prompt,
            "completion": completion,
            "ttft": _ms(created, first_token),
            "wait": _ms(created, started),
        }
        cells[(minute, project)].add(**values)
        cells[(minute, DEPLOYMENT)].add(**values)
    # Every closed minute has a deployment row (zero runs is a figure too).
    for i in range(minutes):
        cells[(start + timedelta(minutes=i), DEPLOYMENT)]  # noqa: B018  (defaultdict: creates it)
    last = end - timedelta(minutes=1)
    gauges = _gauges()
    for project in gauges:
        cells[(last, project)]  # noqa: B018
    older, latest = [], []
    for (minute, project), cell in cells.items():
        row = MinuteRollup(minute=minute, project_id=project, **cell.fields())
        if minute == last:
            for name, value in gauges.get(project, {}).items():
                setattr(row, name, value)
            latest.append(row)
        else:
            older.append(row)
    unique = ["project_id", "minute"]
    MinuteRollup.objects.bulk_create(
        older, update_conflicts=True, unique_fields=unique, update_fields=COUNTS
    )
    MinuteRollup.objects.bulk_create(
        latest, update_conflicts=True, unique_fields=unique, update_fields=COUNTS + GAUGES
    )
    MinuteRollup.objects.filter(
        minute__lt=now - timedelta(days=settings.OBSERVABILITY_ROLLUP_DAYS)
    ).delete()
    return len(older) + len(latest)
