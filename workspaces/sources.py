"""What the apps above workspaces plug into it, without workspaces knowing them.

- An `AgentSource` (`register_agent_source`): a workspace asks it for the agent configs
  it caches. The configs are plain JSON-able dicts with at least "id", "project_id" and
  "updated_at" (ISO 8601).
- Health checks (`register_health_check`): named callables whose report (a dict with
  "healthy") joins the operators' health and stats endpoints.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any, Protocol

AgentConfig = dict[str, Any]


class AgentSource(Protocol):
    def configs(self, *, project_id: uuid.UUID) -> list[AgentConfig]:
        """Every agent of the project, as the AgentCache holds them."""
        ...

    def config(self, *, project_id: uuid.UUID, agent_id: str) -> AgentConfig | None:
        """One agent of the project, or None (gone, or another project's)."""
        ...

    def fingerprint(self, *, project_id: uuid.UUID) -> tuple[int, datetime | None]:
        """(number of agents, newest update): cheap to read, changes with any write."""
        ...


class _NoAgents:
    def configs(self, *, project_id):
        return []

    def config(self, *, project_id, agent_id):
        return None

    def fingerprint(self, *, project_id):
        return 0, None


_source: AgentSource = _NoAgents()


def register_agent_source(source: AgentSource) -> None:
    global _source
    _source = source


def agent_source() -> AgentSource:
    return _source


HealthCheck = Callable[[], dict[str, Any]]
_health_checks: dict[str, HealthCheck] = {}


def register_health_check(name: str, check: HealthCheck) -> None:
    _health_checks[name] = check


def health_checks() -> dict[str, HealthCheck]:
    return dict(_health_checks)
