"""Reads of an agent's context jobs."""

from __future__ import annotations

import uuid

from django.db.models import QuerySet

from agents.models import Agent
from common.selectors import get_or_404
from workspaces.redis import scoped

from .job_records import job_get
from .models import ContextDocument


def context_job_get(*, agent: Agent, job_id: uuid.UUID | str) -> dict | None:
    """A context job of this agent (status lives in workspace Redis for a day), or None."""
    project = agent.project
    job = job_get(redis=scoped(project.owner_id, project.id), job_id=job_id)
    if job is None or job.get("agent_id") != str(agent.id):
        return None
    return job


def context_document_list(*, agent: Agent) -> QuerySet[ContextDocument]:
    return ContextDocument.objects.filter(agent=agent).order_by("created_at").defer("text")


def context_document_get(*, agent: Agent, document_id: uuid.UUID | str) -> ContextDocument:
    return get_or_404(
        ContextDocument.objects.filter(agent=agent).select_related("agent__project"),
        id=document_id,
    )
