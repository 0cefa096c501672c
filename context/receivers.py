"""How the context app plugs into the others: a torn-down project's or a deleted agent's
vector context goes with it (and its jobs leave the recovery index), a worker that can
neither open nor reach the embedded store refuses to start, a stopping worker releases
the store, and a worker says which context job steps it received."""

from __future__ import annotations

import os
import sys

from celery.signals import celeryd_after_setup
from django.conf import settings
from django.dispatch import receiver

from agentbus import on_task_received, publish
from agentbus.queues import runs_project_tasks
from agents.signals import agent_deleted
from common.lifecycle import on_shutdown
from workspaces.redis import scoped
from workspaces.signals import workspace_teardown

from . import job_records
from .tasks import add_context, clear_context, drop_collection, ingest_file
from .vectors import project_collections_drop
from .vectorstore import close_vector_store, get_vector_store


@receiver(workspace_teardown, dispatch_uid="context.collections_on_teardown")
def drop_collections_on_teardown(sender, *, user_id, project_id, **kwargs) -> None:
    # Teardown runs on a worker, where the store is open. It deletes by the project's
    # filter and checks that nothing is left; raising retries the teardown.
    project_collections_drop(user_id=user_id, project_id=project_id)


@receiver(workspace_teardown, dispatch_uid="context.jobs_on_teardown")
def forget_jobs_on_teardown(sender, *, user_id, project_id, **kwargs) -> None:
    job_records.index_forget_workspace(scoped(user_id, project_id))


def _mark_step_received(task_kwargs: dict, worker: str) -> None:
    # Still "on the queue" if this fails: the step is found once the queue is empty.
    job_records.step_received(
        redis=scoped(task_kwargs["user_id"], task_kwargs["project_id"]),
        job_id=task_kwargs["job_id"],
        step=task_kwargs.get("step", ""),
        worker=worker,
    )


# A worker that dies holding a context job's step: the recovery pass (context.recovery)
# sees whose it was.
on_task_received(
    [add_context.name, ingest_file.name, clear_context.name],
    _mark_step_received,
    what="context job step",
)


@receiver(agent_deleted, dispatch_uid="context.collection_on_agent_deleted")
def drop_collection_on_agent_deleted(sender, *, user_id, project_id, agent_id, **kwargs) -> None:
    # On a worker, where the store is open; if this is lost, the collections sweep finds
    # the stray.
    publish(
        drop_collection,
        project_id=project_id,
        kwargs={"user_id": user_id, "agent_id": str(agent_id)},
    )


def refuse_without_vector_store(sender=None, instance=None, **kwargs) -> None:
    """A worker that runs agent or maintenance tasks on the embedded vector store starts
    only if it can reach the store: its own (it takes the owner lease and opens the
    folder) or the owner's (context.store_owner). It opens it once and lets it go, for
    the pool's own processes; with Redis down and the folder held by another process it
    refuses to start with a one-line reason, instead of taking messages and failing
    their answers."""
    if instance is None or settings.QDRANT_URL:
        return
    if not runs_project_tasks(instance.app.amqp.queues.consume_from or {}):
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
