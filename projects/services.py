"""Writes of projects."""

from __future__ import annotations

from typing import Any

from django.db import transaction
from django.http import Http404

from common.services import model_update, on_commit_robust, row_lock_for_write

from .models import Project
from .signals import project_flow_changed

PROJECT_FIELDS = ("name", "description")


def project_create(*, owner, name: str, description: str = "") -> Project:
    return Project.objects.create(owner=owner, name=name, description=description)


def project_update(*, project: Project, data: dict[str, Any]) -> Project:
    with transaction.atomic():
        project_lock_for_write(project_id=project.id)  # a 404 if a delete came first
        project, _ = model_update(instance=project, fields=PROJECT_FIELDS, data=data)
    return project


FLOW_FIELDS = ("flow_weight", "flow_max_in_flight")


def project_flow_update(*, project: Project, data: dict[str, Any]) -> Project:
    """Set a project's flow rules (operators: the admin, the operators' API); the bus
    applies them from the next task it takes. Sends `project_flow_changed` after commit
    (and also when nothing changed, which repairs rules the bus lost with its Redis)."""
    with transaction.atomic():
        project, _ = model_update(instance=project, fields=FLOW_FIELDS, data=data)
        project_flow_announce_on_commit(project=project)
    return project


def project_flow_announce_on_commit(*, project: Project) -> None:
    weight, cap, project_id = project.flow_weight, project.flow_max_in_flight, project.id

    def announce() -> None:
        for _receiver, error in project_flow_changed.send_robust(
            sender=Project, project_id=project_id, weight=weight, max_in_flight=cap
        ):
            if isinstance(error, Exception):
                raise error

    on_commit_robust(announce, name="project_flow_changed")


@transaction.atomic
def project_delete(*, project: Project) -> None:
    """Delete a project and everything it owns.

    The row is locked first, so a write to the project that is in flight finishes (and
    is deleted with it) or waits and finds the project gone (a 404): never a write that
    fails the delete. The delete and the receivers' durable teardown records
    (`project_deleted`) commit together; the teardown of Redis keys, queues and vector
    collections runs after commit.
    """
    if Project.objects.select_for_update().filter(id=project.id).first() is None:
        raise Http404("No such project.")  # a concurrent delete got there first
    project.delete()


def project_lock_for_write(*, project_id) -> Project:
    """Call at the start of a transaction that adds to the project (an agent, a session,
    a message): holds the project until commit against a concurrent delete, which then
    waits for this write and deletes what it added. Returns the locked row; raises
    Http404 if the project was deleted first. The lock (common.services.
    row_lock_for_write) does not queue writers behind each other: a burst of messages to
    one project is not taken one at a time."""
    locked = row_lock_for_write(Project, project_id)
    if locked is None:
        raise Http404("No such project.")
    return locked
