"""Receivers connecting workspaces to project deletion and to process shutdown."""

from __future__ import annotations

from django.dispatch import receiver

from agentbus.flow import flow_rules_set
from common.lifecycle import on_shutdown
from projects.signals import project_deleted, project_flow_changed

from .manager import get_worker_space_manager
from .services import workspace_teardown_schedule


@receiver(project_deleted, dispatch_uid="workspaces.teardown_on_project_deleted")
def teardown_on_project_deleted(sender, *, project_id, user_id, **kwargs) -> None:
    workspace_teardown_schedule(user_id=user_id, project_id=project_id)


@receiver(project_flow_changed, dispatch_uid="workspaces.flow_rules_on_project_flow_changed")
def flow_rules_on_project_flow_changed(
    sender, *, project_id, weight, max_in_flight, **kwargs
) -> None:
    flow_rules_set(project_id=project_id, weight=weight, max_in_flight=max_in_flight)


@on_shutdown
def release_workspaces() -> None:
    """A stopping process releases its workspaces (never their shared state)."""
    get_worker_space_manager().cleanup_all()
