"""Reads of the governance app, scoped to a project the caller already resolved."""

from __future__ import annotations

from django.db.models import QuerySet
from django.http import Http404

from projects.models import Project

from .models import ProjectApiKey


def api_key_list(*, project: Project) -> QuerySet[ProjectApiKey]:
    return ProjectApiKey.objects.filter(project=project)


def api_key_get(*, project: Project, key_id) -> ProjectApiKey:
    """One of the project's keys, or 404 (a key of another project does not exist here)."""
    try:
        return ProjectApiKey.objects.get(project=project, id=key_id)
    except (ProjectApiKey.DoesNotExist, ValueError, TypeError):
        raise Http404("No such API key.") from None
