"""Writes of projects."""

from __future__ import annotations

from typing import Any

from django.db import transaction

from .models import Project
from .signals import project_deleted


def project_create(*, owner, name: str, description: str = "") -> Project:
    return Project.objects.create(owner=owner, name=name, description=description)


def project_update(*, project: Project, data: dict[str, Any]) -> Project:
    fields = [f for f in ("name", "description") if f in data]
    for field in fields:
        setattr(project, field, data[field])
    if fields:
        project.save(update_fields=[*fields, "updated_at"])
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
