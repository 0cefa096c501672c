"""Context tasks: they run from the project's AgentBus queue (the sweep from the
maintenance queue), on workers only, where the vector store is open.

Each task is thin (ids and JSON in, one service called) and idempotent: a redelivered
task, or one whose rows are gone, ends without harm. `AgentBusTask` skips any task of a
deleted project before it runs. Task names keep the `agents.` prefix they were
published under, so messages already queued still find their task.
"""

from __future__ import annotations

import threading

from celery import shared_task
from django.conf import settings

from agentbus import AgentBusTask
from workspaces.redis import scoped

from .jobs import (
    context_file_ingest,
    context_job_add,
    context_job_clear,
    context_search_reply,
    document_forget,
)
from .recovery import documents_lost_fail, jobs_recover, step_give_back, step_publish
from .vectors import collection_drop, collections_sweep

# Dropping a collection only fails while the vector store is down: retry.
STORE_RETRY = {
    "autoretry_for": (Exception,),
    "retry_backoff": 2,
    "retry_backoff_max": 120,
    "retry_jitter": True,
    "max_retries": 10,
}

# Ingest batches run at most this many at a time in one worker process: bulk work
# keeps the rest of the pool's slots (and cores) for interactive runs.
_ingest_slots = threading.BoundedSemaphore(settings.INGEST_CONCURRENCY)


class StepTask(AgentBusTask):
    """A context job's step (context.job_records). A step whose task fails (the database
    or the vector store down, a bug) is given back, and the recovery pass sends it again
    as it does a step whose worker died: the job ends, done or in error, instead of
    reading `running` until its record expires."""

    def on_failure(self, exc, task_id, args, kwargs, einfo):
        step_give_back(kwargs, exc)


# Bulk work: served after the project's chat answers, never starved (agentbus.flow).
# A context job's tasks are its steps (context.job_records): each carries the step's
# token (`step`; "" for jobs from before steps), and sends the next step through
# step_publish, which sends nothing once the recovery pass has sent this step again.
@shared_task(base=StepTask, bind=True, name="agents.add_context", max_retries=None, lane="bulk")
def add_context(
    self,
    *,
    user_id: int,
    project_id: str,
    agent_id: str,
    job_id: str,
    start: int = 0,
    step: str = "",
) -> int | None:
    """One batch of an ingest job; the next batch goes to the back of the project's
    queue, behind whatever other work is waiting. While this process already stores
    INGEST_CONCURRENCY batches, the batch goes back to the queue instead of taking a
    slot an interactive run may need."""
    if not _ingest_slots.acquire(blocking=False):
        raise self.retry(countdown=settings.INGEST_REQUEUE_SECONDS)
    ids = {"user_id": user_id, "agent_id": agent_id, "job_id": job_id}
    try:
        following = context_job_add(project_id=project_id, start=start, step=step, **ids)
    finally:
        _ingest_slots.release()
    if following is not None:
        _next_step(self, project_id=project_id, after=step, kwargs={**ids, "start": following})
    return following


@shared_task(base=StepTask, bind=True, name="context.ingest_file", max_retries=None, lane="bulk")
def ingest_file(
    self,
    *,
    user_id: int,
    project_id: str,
    agent_id: str,
    job_id: str,
    document_id: str,
    step: str = "",
) -> bool:
    """Parse a file job's file (bulk work, like add_context: it takes an ingest slot or
    goes back to the queue); its chunks are then stored by add_context's batches, each
    a task of its own at the back of the project's queue."""
    if not _ingest_slots.acquire(blocking=False):
        raise self.retry(countdown=settings.INGEST_REQUEUE_SECONDS)
    ids = {"user_id": user_id, "agent_id": agent_id, "job_id": job_id}
    try:
        parsed = context_file_ingest(
            project_id=project_id, document_id=document_id, step=step, **ids
        )
    finally:
        _ingest_slots.release()
    if parsed:
        _next_step(add_context, project_id=project_id, after=step, kwargs={**ids, "start": 0})
    return parsed


def _next_step(task, *, project_id: str, after: str, kwargs: dict) -> None:
    step_publish(
        task,
        redis=scoped(kwargs["user_id"], project_id),
        project_id=project_id,
        job_id=kwargs["job_id"],
        after=after,
        kwargs=kwargs,
    )


@shared_task(base=AgentBusTask, bind=True, name="context.forget_document", **STORE_RETRY)
def forget_document(self, *, user_id: int, project_id: str, agent_id: str, keys: list[str]) -> None:
    """Remove a deleted document's points."""
    document_forget(user_id=user_id, project_id=project_id, agent_id=agent_id, keys=keys)


@shared_task(base=StepTask, bind=True, name="agents.clear_context", **STORE_RETRY)
def clear_context(
    self, *, user_id: int, project_id: str, agent_id: str, job_id: str, step: str = ""
) -> dict:
    """A clear job: one step (context.job_records)."""
    return context_job_clear(
        user_id=user_id, project_id=project_id, agent_id=agent_id, job_id=job_id, step=step
    )


@shared_task(base=AgentBusTask, bind=True, name="agents.search_context")
def search_context(
    self,
    *,
    user_id: int,
    project_id: str,
    agent_id: str,
    request_id: str,
    query: str,
    k: int,
    deadline: float,
    mode: str = "dense",
) -> str:
    return context_search_reply(
        mode=mode,
        user_id=user_id,
        project_id=project_id,
        agent_id=agent_id,
        request_id=request_id,
        query=query,
        k=k,
        deadline=deadline,
    )


@shared_task(base=AgentBusTask, bind=True, name="agents.drop_collection", **STORE_RETRY)
def drop_collection(self, *, user_id: int, project_id: str, agent_id: str) -> bool:
    return collection_drop(user_id=user_id, project_id=project_id, agent_id=agent_id)


@shared_task(name="context.recover_jobs", ignore_result=True)
def recover_jobs() -> dict:
    """Beat: send again the steps of context jobs (ingest, clear) whose worker died, whose
    message was lost or whose task failed, and end in error the file documents whose job
    is gone (context.recovery)."""
    return {**jobs_recover(), "documents_lost": documents_lost_fail()}


@shared_task(name="agents.sweep_collections")
def sweep_collections() -> list[str]:
    """Beat: remove vector context left behind by deleted agents and projects, and
    vacuum the shared collections. Runs on the maintenance queue (not a project's), on a
    worker, where the store is open."""
    return collections_sweep()
