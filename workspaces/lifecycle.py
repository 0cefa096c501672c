"""Where the workspaces app, which knows the project rows, keeps the AgentBus's
lifecycle guard (agentbus.guard) true: a tombstone only ever stands for a project that
is gone or being deleted."""

from __future__ import annotations

import logging
import uuid

from agentbus import project_gone, project_revive
from projects.models import Project

from .models import WorkspaceTeardown

logger = logging.getLogger(__name__)


def project_tombstone_heal(*, project_id: uuid.UUID | str) -> bool:
    """Lift the tombstone of a project that exists and is not being deleted (a mistaken
    teardown set it): otherwise its work would be skipped for good. True if lifted."""
    if not project_gone(project_id):
        return False
    if not Project.objects.filter(id=project_id).exists():
        return False
    if WorkspaceTeardown.objects.filter(
        project_id=project_id, status=WorkspaceTeardown.Status.PENDING
    ).exists():
        return False
    if project_revive(project_id):
        logger.warning("project %s: lifted the tombstone of a live project", project_id)
        return True
    return False
