"""Health's `llm` check: which endpoint agents answer through and whether it answers."""

from workspaces.sources import register_health_check

from .selectors import llm_health

# Not a check that breaks every tenant: a project may answer through its own provider
# credentials while the deployment's endpoint is down.
register_health_check("llm", llm_health)
