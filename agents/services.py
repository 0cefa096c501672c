"""Writes of agents, sessions and messages."""

from __future__ import annotations

from typing import Any

from django.db import transaction

from projects.models import Project
from workspaces.services import workspace_agent_sync_on_commit

from .models import Agent, ChatSession, Message

AGENT_FIELDS = ("name", "system_prompt", "model", "params")


def agent_create(
    *,
    project: Project,
    name: str,
    system_prompt: str = "",
    model: str = "",
    params: dict[str, Any] | None = None,
) -> Agent:
    agent = Agent.objects.create(
        project=project, name=name, system_prompt=system_prompt, model=model, params=params or {}
    )
    # The workspace's AgentCache and bus registration follow the committed row.
    workspace_agent_sync_on_commit(project_id=project.id, agent_id=agent.id)
    return agent


def agent_update(*, agent: Agent, data: dict[str, Any]) -> Agent:
    fields = [f for f in AGENT_FIELDS if f in data]
    for field in fields:
        setattr(agent, field, data[field])
    if fields:
        agent.save(update_fields=[*fields, "updated_at"])
        workspace_agent_sync_on_commit(project_id=agent.project_id, agent_id=agent.id)
    return agent


@transaction.atomic
def agent_delete(*, agent: Agent) -> None:
    project_id, agent_id = agent.project_id, agent.id
    agent.delete()
    workspace_agent_sync_on_commit(project_id=project_id, agent_id=agent_id)


def session_create(*, project: Project, agent: Agent, title: str = "") -> ChatSession:
    if agent.project_id != project.id:
        raise ValueError("the agent belongs to another project")
    return ChatSession.objects.create(project=project, agent=agent, title=title)


def session_delete(*, session: ChatSession) -> None:
    session.delete()


def message_create(*, session: ChatSession, content: str) -> Message:
    """Store a user's message."""
    return Message.objects.create(
        session=session, role=Message.Role.USER, content=content, status=Message.Status.DONE
    )
