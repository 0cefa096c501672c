"""How the agents app plugs into the others: it is the workspaces' agent source."""

from __future__ import annotations

from workspaces.sources import register_agent_source

from .sources import DatabaseAgentSource

register_agent_source(DatabaseAgentSource())
