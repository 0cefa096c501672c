"""Receivers connecting workspaces to project deletion and to process shutdown."""

from __future__ import annotations

import atexit

from celery.signals import worker_process_shutdown, worker_shutdown
from django.dispatch import receiver

from projects.signals import project_deleted

from .manager import get_worker_space_manager
from .services import workspace_teardown_schedule


@receiver(project_deleted, dispatch_uid="workspaces.teardown_on_project_deleted")
def teardown_on_project_deleted(sender, *, project_id, user_id, **kwargs) -> None:
    workspace_teardown_schedule(user_id=user_id, project_id=project_id)


@worker_shutdown.connect(dispatch_uid="workspaces.cleanup_on_worker_shutdown")
@worker_process_shutdown.connect(dispatch_uid="workspaces.cleanup_on_worker_process_shutdown")
def cleanup_on_worker_shutdown(**kwargs) -> None:
    get_worker_space_manager().cleanup_all()


# Any other process exit (management commands, a WSGI server).
atexit.register(lambda: get_worker_space_manager().cleanup_all())
