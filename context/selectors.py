"""Reads of an agent's context jobs."""

from __future__ import annotations

import uuid

from agents.models import Agent
from workspaces.redis import scoped

from .job_records import job_get


def context_job_get(*, agent: Agent, job_id: uuid.UUID | str) -> dict | None:
    """A context job of this agent (status lives in workspace Redis for a day), or None."""
    project = agent.project
    job = job_get(redis=scoped(project.owner_id, project.id), job_id=job_id)
    if job is None or job.get("agent_id") != str(agent.id):
        return None
    return job
