"""Writes of projects."""

from __future__ import annotations

from typing import Any

from django.db import transaction

from common.services import model_update

from .models import Project
from .signals import project_deleted

PROJECT_FIELDS = ("name", "description")


def project_create(*, owner, name: str, description: str = "") -> Project:
    return Project.objects.create(owner=owner, name=name, description=description)


def project_update(*, project: Project, data: dict[str, Any]) -> Project:
    project, _ = model_update(instance=project, fields=PROJECT_FIELDS, data=data)
    return project


@transaction.atomic
def project_delete(*, project: Project) -> None:
    """Delete a project and everything it owns.

    The database delete and the receivers' durable teardown records commit together;
    the receivers put the teardown of Redis keys, queues and vector collections on the
    bus after commit.
    """
    project_id, user_id = project.id, project.owner_id
    project.delete()
    project_deleted.send(sender=Project, project_id=project_id, user_id=user_id)
