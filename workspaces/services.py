"""Writes of workspaces: keeping the AgentCache in step with agent writes, reset, and
scheduling the durable teardown of a deleted project's workspace."""

from __future__ import annotations

import logging
import uuid

from celery import current_app
from django.utils import timezone

from agentbus import MAINTENANCE_QUEUE, project_tombstone
from common.services import on_commit_robust
from projects.models import Project

from . import registry
from .manager import get_worker_space_manager
from .models import WorkspaceTeardown
from .registry import State
from .sources import agent_source
from .space import UserWorkerSpace

logger = logging.getLogger(__name__)

# The teardown task (workspaces.tasks), sent by name: the task module imports this one.
TEARDOWN_TASK = "workspaces.teardown_workspace"


def as_uuid(value: uuid.UUID | str) -> uuid.UUID:
    return value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))


def workspace_handle(*, user_id: int, project_id: uuid.UUID) -> UserWorkerSpace:
    """This process's handle on the workspace, or a detached one that does not
    initialise anything (for writes that must not bring a workspace to life)."""
    space = get_worker_space_manager().get(user_id=user_id, project_id=project_id)
    return space or UserWorkerSpace(user_id=user_id, project_id=project_id)


# --- agents ------------------------------------------------------------------------


def workspace_agent_sync(*, project_id: uuid.UUID | str, agent_id: uuid.UUID | str) -> None:
    """Bring the workspace's AgentCache in line with the database for one agent, after an
    agent write committed (create, update or delete).

    Reads the committed row, so it is idempotent and order-independent. A workspace that
    is not initialised is left alone: its initialisation loads the agents.
    """
    project_id = as_uuid(project_id)
    owner_id = Project.objects.filter(id=project_id).values_list("owner_id", flat=True).first()
    if owner_id is None:
        return  # the project is gone: its teardown takes care of everything
    space = workspace_handle(user_id=owner_id, project_id=project_id)
    config = agent_source().config(project_id=project_id, agent_id=str(agent_id))
    if config is None:
        space.remove_agent(agent_id)
        return
    state, _ = registry.read_state(space.redis)
    if state in (State.INITIALIZED, State.INITIALIZING):
        space.add_agent(config)


def workspace_agent_sync_on_commit(*, project_id: uuid.UUID, agent_id: uuid.UUID) -> None:
    """`workspace_agent_sync` after the current transaction commits. A failure there
    (Redis down) is logged, not raised: the write is committed, and the cache heals at
    the workspace's next revalidation or initialisation."""
    on_commit_robust(
        lambda: workspace_agent_sync(project_id=project_id, agent_id=agent_id),
        name=f"workspace_agent_sync(project={project_id}, agent={agent_id})",
    )


def workspace_reset(*, user_id: int, project_id: uuid.UUID | str) -> None:
    """Operator action: drop the workspace's AgentCache; the next use (in any process)
    initialises it again from the database."""
    workspace_handle(user_id=user_id, project_id=as_uuid(project_id)).reset()


# --- teardown ----------------------------------------------------------------------


def workspace_teardown_schedule(*, user_id: int, project_id: uuid.UUID | str) -> WorkspaceTeardown:
    """Record that the workspace's teardown is owed, in the caller's transaction, and
    put it on the bus once that commits."""
    project_id = as_uuid(project_id)
    row, _ = WorkspaceTeardown.objects.update_or_create(
        project_id=project_id,
        defaults={
            "user_id": int(user_id),
            "status": WorkspaceTeardown.Status.PENDING,
            "completed_at": None,
            "created_at": timezone.now(),
        },
    )
    # Robust: the delete has committed whatever happens; if Redis or the broker is down
    # the row stays pending and the sweep dispatches it later.
    on_commit_robust(
        lambda: workspace_teardown_dispatch(project_id=project_id),
        name=f"workspace_teardown_dispatch(project={project_id})",
    )
    return row


def workspace_teardown_dispatch(*, project_id: uuid.UUID | str) -> bool:
    """Tombstone the project (its tasks are skipped from now on) and enqueue the
    teardown task on the maintenance queue. Returns False if nothing is owed."""
    project_id = as_uuid(project_id)
    row = WorkspaceTeardown.objects.filter(
        project_id=project_id, status=WorkspaceTeardown.Status.PENDING
    ).first()
    if row is None:
        return False
    get_worker_space_manager().remove(user_id=row.user_id, project_id=project_id)
    if not Project.objects.filter(id=project_id).exists():
        # Only a deleted project is tombstoned (the task skips a live one).
        project_tombstone(project_id)
    current_app.send_task(
        TEARDOWN_TASK,
        kwargs={"user_id": row.user_id, "project_id": str(project_id)},
        queue=MAINTENANCE_QUEUE,
    )
    WorkspaceTeardown.objects.filter(pk=row.pk).update(dispatched_at=timezone.now())
    return True
