"""Reads of the governance app, scoped to a project the caller already resolved."""

from __future__ import annotations

from datetime import date

from django.db.models import Count, Q, QuerySet, Sum
from django.db.models.functions import Coalesce
from django.http import Http404

from projects.models import Project

from .models import (
    AuditEvent,
    EmbeddingUsage,
    ProjectApiKey,
    ProviderSettings,
    RunUsage,
    UsageDaily,
)


def api_key_list(*, project: Project) -> QuerySet[ProjectApiKey]:
    return ProjectApiKey.objects.filter(project=project)


def api_key_get(*, project: Project, key_id) -> ProjectApiKey:
    """One of the project's keys, or 404 (a key of another project does not exist here)."""
    try:
        return ProjectApiKey.objects.get(project=project, id=key_id)
    except (ProjectApiKey.DoesNotExist, ValueError, TypeError):
        raise Http404("No such API key.") from None


USAGE_GROUPS = {"day": "day", "agent": "agent_id", "model": "model"}
ROLLUP_SUMS = ("runs", "estimated_runs", "prompt_tokens", "completion_tokens", "total_tokens",
               "tool_calls", "latency_ms_sum", "latency_count")  # fmt: skip


def usage_summary(*, project: Project, date_from: date, date_to: date, group_by: str) -> dict:
    """The project's usage from `date_from` to `date_to` (UTC days, both included): its
    runs by the day each message was accepted, and the tokens its context ingests
    embedded; totals, and the same sums per day, agent or model. Raw rows and the daily
    rollups retention made of older ones (governance.rollups) count alike."""
    window = {"project_id": project.id, "day__gte": date_from, "day__lte": date_to}
    rows = RunUsage.objects.filter(**window)
    embedded = EmbeddingUsage.objects.filter(**window)
    rollups = UsageDaily.objects.filter(**window)
    sums = {
        "runs": Count("run_id"),
        "estimated_runs": Count("run_id", filter=Q(estimated=True)),
        "prompt_tokens": Coalesce(Sum("prompt_tokens"), 0),
        "completion_tokens": Coalesce(Sum("completion_tokens"), 0),
        "total_tokens": Coalesce(Sum("total_tokens"), 0),
        "tool_calls": Coalesce(Sum("tool_calls"), 0),
        "latency_ms_sum": Coalesce(Sum("latency_ms"), 0),
        "latency_count": Count("latency_ms"),
    }
    rolled = {name: Coalesce(Sum(name), 0) for name in (*ROLLUP_SUMS, "embedding_tokens")}
    empty = dict.fromkeys((*ROLLUP_SUMS, "embedding_tokens"), 0)
    field = USAGE_GROUPS[group_by]
    groups: dict[str, dict] = {}
    totals = dict(empty)

    def add(key: str, amounts: dict) -> None:
        for target in (totals, groups.setdefault(key, dict(empty))):
            for name, amount in amounts.items():
                target[name] += amount or 0

    for group in rows.values(field).annotate(**sums).order_by():
        add(str(group.pop(field)), group)
    for group in embedded.values(field).annotate(tokens=Sum("tokens")).order_by():
        add(str(group[field]), {"embedding_tokens": group["tokens"]})
    for group in rollups.values(field).annotate(**rolled).order_by():
        add(str(group.pop(field)), group)

    def finish(entry: dict) -> dict:
        count, total = entry.pop("latency_count"), entry.pop("latency_ms_sum")
        return {**entry, "latency_ms_avg": total / count if count else None}

    return {
        "from": date_from,
        "to": date_to,
        "group_by": group_by,
        "totals": finish(totals),
        "groups": [{"key": key, **finish(groups[key])} for key in sorted(groups)],
    }


def provider_settings_get(*, project: Project) -> ProviderSettings:
    """The project's provider settings; an unsaved empty one when none were set."""
    return ProviderSettings.objects.filter(project=project).first() or ProviderSettings(
        project=project, updated_at=None
    )


def audit_list(*, project: Project) -> QuerySet[AuditEvent]:
    return AuditEvent.objects.filter(project_id=project.id)
