"""Reads of the governance app, scoped to a project the caller already resolved."""

from __future__ import annotations

from datetime import date

from django.db.models import Avg, Count, Q, QuerySet, Sum
from django.db.models.functions import Coalesce
from django.http import Http404

from projects.models import Project

from .models import AuditEvent, EmbeddingUsage, ProjectApiKey, ProviderSettings, RunUsage


def api_key_list(*, project: Project) -> QuerySet[ProjectApiKey]:
    return ProjectApiKey.objects.filter(project=project)


def api_key_get(*, project: Project, key_id) -> ProjectApiKey:
    """One of the project's keys, or 404 (a key of another project does not exist here)."""
    try:
        return ProjectApiKey.objects.get(project=project, id=key_id)
    except (ProjectApiKey.DoesNotExist, ValueError, TypeError):
        raise Http404("No such API key.") from None


USAGE_GROUPS = {"day": "day", "agent": "agent_id", "model": "model"}


def usage_summary(*, project: Project, date_from: date, date_to: date, group_by: str) -> dict:
    """The project's usage from `date_from` to `date_to` (UTC days, both included): its
    runs by the day each message was accepted, and the tokens its context ingests
    embedded; totals, and the same sums per day, agent or model."""
    rows = RunUsage.objects.filter(project_id=project.id, day__gte=date_from, day__lte=date_to)
    embedded = EmbeddingUsage.objects.filter(
        project_id=project.id, day__gte=date_from, day__lte=date_to
    )
    sums = {
        "runs": Count("run_id"),
        "estimated_runs": Count("run_id", filter=Q(estimated=True)),
        "prompt_tokens": Coalesce(Sum("prompt_tokens"), 0),
        "completion_tokens": Coalesce(Sum("completion_tokens"), 0),
        "total_tokens": Coalesce(Sum("total_tokens"), 0),
        "tool_calls": Coalesce(Sum("tool_calls"), 0),
        "latency_ms_avg": Avg("latency_ms"),
    }
    empty = {"runs": 0, "estimated_runs": 0, "prompt_tokens": 0, "completion_tokens": 0,
             "total_tokens": 0, "tool_calls": 0, "latency_ms_avg": None,
             "embedding_tokens": 0}  # fmt: skip
    field = USAGE_GROUPS[group_by]
    groups: dict[str, dict] = {}
    for group in rows.values(field).annotate(**sums).order_by():
        groups[str(group.pop(field))] = {**empty, **group}
    for group in embedded.values(field).annotate(tokens=Sum("tokens")).order_by():
        key = str(group[field])
        groups.setdefault(key, dict(empty))["embedding_tokens"] = group["tokens"] or 0
    totals = {**empty, **rows.aggregate(**sums)}
    totals["embedding_tokens"] = embedded.aggregate(t=Coalesce(Sum("tokens"), 0))["t"]
    return {
        "from": date_from,
        "to": date_to,
        "group_by": group_by,
        "totals": totals,
        "groups": [{"key": key, **groups[key]} for key in sorted(groups)],
    }


def provider_settings_get(*, project: Project) -> ProviderSettings:
    """The project's provider settings; an unsaved empty one when none were set."""
    return ProviderSettings.objects.filter(project=project).first() or ProviderSettings(
        project=project, updated_at=None
    )


def audit_list(*, project: Project) -> QuerySet[AuditEvent]:
    return AuditEvent.objects.filter(project_id=project.id)
