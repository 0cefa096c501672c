"""Reads of agents, sessions and messages, always inside one (already scoped) project."""

from __future__ import annotations

import uuid

from django.db.models import QuerySet
from django.http import Http404

from projects.models import Project
from workspaces.redis import scoped

from .models import Agent, ChatSession, Message
from .runtime.streams import job_get


def _get_or_404(queryset: QuerySet, **lookup):
    try:
        return queryset.get(**lookup)
    except (queryset.model.DoesNotExist, ValueError, TypeError):
        raise Http404(f"No such {queryset.model._meta.verbose_name}.") from None


def agent_list(*, project: Project) -> QuerySet[Agent]:
    return Agent.objects.filter(project=project)


def agent_get(*, project: Project, agent_id: uuid.UUID | str) -> Agent:
    return _get_or_404(agent_list(project=project), id=agent_id)


def session_list(*, project: Project) -> QuerySet[ChatSession]:
    return ChatSession.objects.filter(project=project)


def session_get(*, project: Project, session_id: uuid.UUID | str) -> ChatSession:
    return _get_or_404(session_list(project=project), id=session_id)


def message_list(*, session: ChatSession) -> QuerySet[Message]:
    return Message.objects.filter(session=session)


def agent_config(agent: Agent) -> dict:
    """An agent as the plain config the AgentCache holds."""
    return {
        "id": str(agent.id),
        "project_id": str(agent.project_id),
        "name": agent.name,
        "system_prompt": agent.system_prompt,
        "model": agent.model,
        "params": agent.params,
        "updated_at": agent.updated_at.isoformat(),
    }


def context_job_get(*, agent: Agent, job_id: uuid.UUID | str) -> dict | None:
    """A context job of this agent (status lives in workspace Redis for a day), or None."""
    project = agent.project
    job = job_get(redis=scoped(project.owner_id, project.id), job_id=job_id)
    if job is None or job.get("agent_id") != str(agent.id):
        return None
    return job
