"""Reads of projects, always scoped to the requesting user."""

from __future__ import annotations

import uuid

from django.db.models import QuerySet
from django.http import Http404

from .models import Project


def project_list(*, user) -> QuerySet[Project]:
    return Project.objects.filter(owner=user)


def project_get_for_user(*, user, project_id: uuid.UUID | str) -> Project:
    """The user's project, or 404: another user's project does not exist for them."""
    try:
        return Project.objects.get(owner=user, id=project_id)
    except (Project.DoesNotExist, ValueError, TypeError):
        raise Http404("No such project.") from None
