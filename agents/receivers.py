"""How the agents app plugs into the others: it is the workspaces' agent source, a
torn-down project's vector context goes with it, a worker says which runs it received,
and a stopping worker releases the vector store."""

from __future__ import annotations

import logging
import os
import sys

from celery.signals import celeryd_after_setup, task_received
from django.conf import settings
from django.dispatch import receiver

from agentbus import MAINTENANCE_QUEUE, worker_identity
from agentbus.queues import is_project_queue
from common.lifecycle import on_loop_shutdown, on_shutdown
from governance.sources import register_run_source
from workspaces.redis import scoped
from workspaces.signals import workspace_teardown
from workspaces.sources import (
    register_agent_source,
    register_health_check,
    register_project_health_check,
)

from .runtime import streams
from .runtime.vectors import project_collections_drop
from .runtime.vectorstore import close_vector_store, get_vector_store
from .selectors import llm_health, project_runs_health, runs_health
from .sources import DatabaseAgentSource, DatabaseRunSource
from .streamhub import close_hub
from .tasks import run_agent

logger = logging.getLogger(__name__)

register_agent_source(DatabaseAgentSource())
# Governance rebuilds its quota counters from the runs in the database.
register_run_source(DatabaseRunSource())
# Neither breaks every tenant: failed runs are some projects' problem, and a project may
# answer through its own provider credentials while the deployment's endpoint is down.
register_health_check("runs", runs_health)
register_health_check("llm", llm_health)
register_project_health_check("runs", project_runs_health)


@receiver(workspace_teardown, dispatch_uid="agents.collections_on_teardown")
def drop_collections_on_teardown(sender, *, user_id, project_id, **kwargs) -> None:
    # Teardown runs on a worker, where the store is open. It deletes by the project's
    # filter and checks that nothing is left; raising retries the teardown.
    project_collections_drop(user_id=user_id, project_id=project_id)


def mark_run_received(sender=None, request=None, **kwargs) -> None:
    """The run's task left the queue for this worker: if the worker dies before the run
    starts, the recovery pass sees whose it was (agents.runs) instead of waiting out
    the broker's visibility timeout."""
    if request is None or request.name != run_agent.name:
        return
    try:
        task_kwargs = request.kwargs
        streams.runs_mark_reserved(
            redis=scoped(task_kwargs["user_id"], task_kwargs["project_id"]),
            run_id=task_kwargs["run_id"],
            worker=worker_identity(request.hostname),
        )
    except Exception:
        # Still marked "on the queue", the run is found once the queue is empty; a
        # mark must never fail the delivery.
        logger.warning("could not mark run received", exc_info=True)


task_received.connect(mark_run_received, weak=False, dispatch_uid="agents.run_received")


def refuse_without_vector_store(sender=None, instance=None, **kwargs) -> None:
    """A worker that runs agent or maintenance tasks on the embedded vector store (local
    mode: one process at a time) starts only if it can open the store: a second one
    would take messages and fail their answers. It opens it once (and lets it go, for
    the pool's own processes) and refuses to start with a one-line reason."""
    if instance is None or settings.QDRANT_URL:
        return
    queues = instance.app.amqp.queues.consume_from or {}
    if not any(q == MAINTENANCE_QUEUE or is_project_queue(q) for q in queues):
        return  # e.g. the urgent maintenance worker: nothing it runs opens the store
    try:
        get_vector_store().open()
    except RuntimeError as exc:
        reason = str(exc).splitlines()[0]
        sys.stderr.write(f"worker {sender}: refusing to start: {reason}\n")
        sys.stderr.flush()
        os._exit(78)  # EX_CONFIG; before any message is taken
    finally:
        close_vector_store()


celeryd_after_setup.connect(
    refuse_without_vector_store, weak=False, dispatch_uid="agents.vector_store_check"
)

# Local mode frees the storage folder's lock on the way out.
on_shutdown(close_vector_store)
# A web process's event streams share one hub per event loop.
on_loop_shutdown(close_hub)
