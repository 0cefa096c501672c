"""Reads of agents, their tools and the project's secrets, always inside one (already
scoped) project."""

from __future__ import annotations

import uuid

from django.db.models import QuerySet
from django.http import Http404

from common.selectors import get_or_404
from common.services import row_lock_for_write
from projects.models import Project

from .models import Agent, MemoryBlock, MemoryChange, ProjectSecret, Tool


def agent_lock_for_write(*, agent_id) -> Agent:
    """Call in a transaction that adds to an agent (a version, a tool, a session, a
    memory block), after project_lock_for_write: holds it until commit against a
    concurrent delete, which then waits and deletes what was added. Returns the locked
    row; Http404 if the agent was deleted first."""
    locked = row_lock_for_write(Agent, agent_id)
    if locked is None:
        raise Http404("No such agent.")
    return locked


def agent_list(*, project: Project) -> QuerySet[Agent]:
    return Agent.objects.filter(project=project)


def agent_get(*, project: Project, agent_id: uuid.UUID | str) -> Agent:
    return get_or_404(agent_list(project=project), id=agent_id)


def agent_get_in(*, projects: QuerySet[Project], agent_id: uuid.UUID | str) -> Agent:
    """The agent of the one project in `projects` (a scoped project, not read yet:
    realtime.auth), with its project, in one query. Http404 for the project when it is
    not there, else for the agent."""
    try:
        return Agent.objects.select_related("project").get(id=agent_id, project__in=projects)
    except (Agent.DoesNotExist, ValueError, TypeError):
        get_or_404(projects)  # "No such project." when the project is what is missing
        raise Http404("No such agent.") from None


def tool_list(*, agent: Agent) -> QuerySet[Tool]:
    return Tool.objects.filter(agent=agent)


def tool_get(*, agent: Agent, tool_id: uuid.UUID | str) -> Tool:
    return get_or_404(tool_list(agent=agent).select_related("agent"), id=tool_id)


def secret_list(*, project: Project) -> QuerySet[ProjectSecret]:
    return ProjectSecret.objects.filter(project=project)


def secret_get(*, project: Project, name: str) -> ProjectSecret:
    return get_or_404(secret_list(project=project), name=name)


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


def memory_block_list(*, agent: Agent) -> QuerySet[MemoryBlock]:
    return MemoryBlock.objects.filter(agent=agent).order_by("created_at", "label")


def memory_block_get(*, agent: Agent, label: str) -> MemoryBlock:
    return get_or_404(memory_block_list(agent=agent).select_related("agent"), label=label)


def memory_change_list(*, agent: Agent) -> QuerySet[MemoryChange]:
    return MemoryChange.objects.filter(agent=agent)
