"""How the context app plugs into the others: a torn-down project's or a deleted agent's
vector context goes with it, and a stopping worker releases the vector store."""

from __future__ import annotations

from django.dispatch import receiver

from agentbus import publish
from agents.signals import agent_deleted
from common.lifecycle import on_shutdown
from workspaces.signals import workspace_teardown

from .tasks import drop_collection
from .vectors import project_collections_drop
from .vectorstore import close_vector_store


@receiver(workspace_teardown, dispatch_uid="context.collections_on_teardown")
def drop_collections_on_teardown(sender, *, user_id, project_id, **kwargs) -> None:
    # Teardown runs on a worker, where the store is open. It deletes by the project's
    # filter and checks that nothing is left; raising retries the teardown.
    project_collections_drop(user_id=user_id, project_id=project_id)


@receiver(agent_deleted, dispatch_uid="context.collection_on_agent_deleted")
def drop_collection_on_agent_deleted(sender, *, user_id, project_id, agent_id, **kwargs) -> None:
    # On a worker, where the store is open; if this is lost, the collections sweep finds
    # the stray.
    publish(
        drop_collection,
        project_id=project_id,
        kwargs={"user_id": user_id, "agent_id": str(agent_id)},
    )


# Local mode frees the storage folder's lock on the way out.
on_shutdown(close_vector_store)
