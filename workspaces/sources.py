"""Where a workspace gets its agents from, without knowing the app that owns them.

The agents app registers an `AgentSource` when it loads (`register_agent_source`); a
workspace asks it for the configs it caches. The configs are plain JSON-able dicts
with at least "id", "project_id" and "updated_at" (ISO 8601).
"""

from __future__ import annotations

import uuid
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
