"""The agents app as the workspaces' agent source (workspaces.sources.AgentSource)."""

from __future__ import annotations

import uuid
from datetime import datetime

from django.db.models import Count, Max

from .models import Agent
from .selectors import agent_config


class DatabaseAgentSource:
    def configs(self, *, project_id: uuid.UUID) -> list[dict]:
        agents = Agent.objects.filter(project_id=project_id).order_by("created_at", "id")
        return [agent_config(agent) for agent in agents]

    def config(self, *, project_id: uuid.UUID, agent_id: str) -> dict | None:
        agent = Agent.objects.filter(project_id=project_id, id=agent_id).first()
        return agent_config(agent) if agent is not None else None

    def fingerprint(self, *, project_id: uuid.UUID) -> tuple[int, datetime | None]:
        found = Agent.objects.filter(project_id=project_id).aggregate(
            n=Count("id"), latest=Max("updated_at")
        )
        return found["n"], found["latest"]
