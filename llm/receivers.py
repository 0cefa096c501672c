"""Health's `llm` check: which endpoint agents answer through and whether it answers."""

from workspaces.sources import register_health_check

from .selectors import llm_health

register_health_check("llm", llm_health)
