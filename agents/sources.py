"""The agents app as the workspaces' agent source (workspaces.sources.AgentSource)."""

from __future__ import annotations

import uuid
from datetime import datetime

from django.db.models import Count, Max

from .models import Agent, Run
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


class DatabaseRunSource:
    """The agents app as governance's run source (governance.sources.RunSource)."""

    @staticmethod
    def _runs(*, project_id=None, user_id=None):
        runs = Run.objects.all()
        if project_id is not None:
            runs = runs.filter(session__project_id=project_id)
        if user_id is not None:
            runs = runs.filter(session__project__owner_id=user_id)
        return runs

    def in_flight(self, *, project_id=None, user_id=None) -> list[tuple[uuid.UUID, datetime]]:
        runs = self._runs(project_id=project_id, user_id=user_id)
        live = runs.filter(status__in=(Run.Status.QUEUED, Run.Status.RUNNING))
        return list(live.values_list("id", "created_at"))

    def accepted_since(self, *, since: datetime, project_id=None, user_id=None) -> int:
        return (
            self._runs(project_id=project_id, user_id=user_id).filter(created_at__gte=since).count()
        )
