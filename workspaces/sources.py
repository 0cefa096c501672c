"""What the apps above workspaces plug into it, without workspaces knowing them.

- An `AgentSource` (`register_agent_source`): a workspace asks it for the agent configs
  it caches. The configs are plain JSON-able dicts with at least "id", "project_id" and
  "updated_at" (ISO 8601).
- Health checks (`register_health_check`): named callables whose report (a dict with
  "healthy") joins the operators' health and stats endpoints. Only a check registered
  with `breaks_everyone=True` makes the deployment's health answer 503; the others are
  listed (and name the projects they concern) without taking every tenant offline.
- Project health checks (`register_project_health_check`): the same, for one project
  (the per-project health route).
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
ProjectHealthCheck = Callable[[uuid.UUID], dict[str, Any]]
_health_checks: dict[str, HealthCheck] = {}
_breaks_everyone: set[str] = set()
_project_health_checks: dict[str, ProjectHealthCheck] = {}


def register_health_check(name: str, check: HealthCheck, *, breaks_everyone: bool = False) -> None:
    _health_checks[name] = check
    if breaks_everyone:
        _breaks_everyone.add(name)
    else:
        _breaks_everyone.discard(name)


def health_checks() -> dict[str, HealthCheck]:
    return dict(_health_checks)


def health_check_breaks_everyone(name: str) -> bool:
    """Whether this registered check failing means no tenant can be served."""
    return name in _breaks_everyone


def register_project_health_check(name: str, check: ProjectHealthCheck) -> None:
    _project_health_checks[name] = check


def project_health_checks() -> dict[str, ProjectHealthCheck]:
    return dict(_project_health_checks)
