"""How agents react to workspace lifecycle signals: their vector collections follow them.

Web processes never open the vector store, so registration and deregistration put a
task on the project's bus; teardown already runs on a worker and drops collections in
place (raising, so the teardown task retries while the store is down).
"""

from __future__ import annotations

from celery.signals import worker_process_shutdown, worker_shutdown
from django.dispatch import receiver

from workspaces.signals import agent_deregistered, agents_registered, workspace_teardown


@receiver(agents_registered, dispatch_uid="agents.collections_on_register")
def create_collections_on_register(sender, *, user_id, project_id, agent_ids, **kwargs) -> None:
    if not agent_ids:
        return
    from workspaces.bus import get_agent_bus

    from .tasks import ensure_collections

    get_agent_bus().publish(
        ensure_collections,
        user_id=user_id,
        project_id=project_id,
        kwargs={"agent_ids": [str(a) for a in agent_ids]},
    )


@receiver(agent_deregistered, dispatch_uid="agents.collection_on_deregister")
def drop_collection_on_deregister(sender, *, user_id, project_id, agent_id, **kwargs) -> None:
    from workspaces.bus import get_agent_bus

    from .tasks import drop_collection

    get_agent_bus().publish(
        drop_collection,
        user_id=user_id,
        project_id=project_id,
        kwargs={"agent_id": str(agent_id)},
    )


@receiver(workspace_teardown, dispatch_uid="agents.collections_on_teardown")
def drop_collections_on_teardown(sender, *, user_id, project_id, **kwargs) -> None:
    from .runtime.context import project_collections_drop

    project_collections_drop(user_id=user_id, project_id=project_id)


@worker_process_shutdown.connect(dispatch_uid="agents.close_vector_store_process")
@worker_shutdown.connect(dispatch_uid="agents.close_vector_store")
def close_vector_store_on_shutdown(**kwargs) -> None:
    """Release the vector store (in local mode, the storage folder's lock) on the way out."""
    from .runtime.vectorstore import close_vector_store

    close_vector_store()
