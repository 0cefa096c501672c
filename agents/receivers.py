"""How the agents app plugs into the others: it is the workspaces' agent source, a
torn-down project's vector context goes with it, and a stopping worker releases the
vector store."""

from __future__ import annotations

from django.dispatch import receiver

from common.lifecycle import on_loop_shutdown, on_shutdown
from workspaces.signals import workspace_teardown
from workspaces.sources import register_agent_source, register_health_check

from .runtime.vectors import project_collections_drop
from .runtime.vectorstore import close_vector_store
from .selectors import llm_health, runs_health
from .sources import DatabaseAgentSource
from .streamhub import close_hub

register_agent_source(DatabaseAgentSource())
register_health_check("runs", runs_health)
register_health_check("llm", llm_health)


@receiver(workspace_teardown, dispatch_uid="agents.collections_on_teardown")
def drop_collections_on_teardown(sender, *, user_id, project_id, **kwargs) -> None:
    # Teardown runs on a worker, where the store is open. It deletes by the project's
    # filter and checks that nothing is left; raising retries the teardown.
    project_collections_drop(user_id=user_id, project_id=project_id)


# Local mode frees the storage folder's lock on the way out.
on_shutdown(close_vector_store)
# A web process's event streams share one hub per event loop.
on_loop_shutdown(close_hub)
