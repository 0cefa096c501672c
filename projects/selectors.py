"""Reads of projects, always scoped to the requesting user."""

from __future__ import annotations

import uuid

from django.db.models import QuerySet
from django.http import Http404

from common.credentials import credential_project_id

from .models import Project


def project_list(*, user, credential=None) -> QuerySet[Project]:
    """The user's projects; only its own project for a project-scoped `credential`
    (`request.auth`, see common.credentials)."""
    projects = Project.objects.filter(owner=user)
    limited_to = credential_project_id(credential)
    return projects if limited_to is None else projects.filter(id=limited_to)


def project_get_for_user(*, user, project_id: uuid.UUID | str, credential=None) -> Project:
    """The user's project, or 404: another user's project does not exist for them, nor
    any project but its own for a project-scoped `credential`."""
    try:
        return project_list(user=user, credential=credential).get(id=project_id)
    except (Project.DoesNotExist, ValueError, TypeError):
        raise Http404("No such project.") from None
