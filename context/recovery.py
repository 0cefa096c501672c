"""A context job's steps on the bus, and the recovery pass that sends again a step whose
worker died or whose message was lost (job_records says what a step is).

A worker SIGKILLed mid-step keeps the step's message unacknowledged until the broker's
visibility timeout (an hour) gives it back; a step whose message is lost (Redis, a
publish that failed after the step was recorded) would never come back. The pass (beat,
with the runs' recovery, every RUN_RECOVERY_SECONDS) finds both in the index of jobs not
ended, as the runs' pass does for runs (chat.dispatch):

- a step received by a worker that no longer beats (agentbus.live_workers);
- a step on the queue for RUN_REDISPATCH_SECONDS while the project's queue is empty;
- a step whose task failed (the database or the vector store down, a bug: `StepTask`
  gives it back), RUN_REDISPATCH_SECONDS after it failed, twice that after each
  failure before it.

It sends the step again under a new token, so the first message, if it ever comes back,
finds its step no longer owed and does nothing: one chain of steps per job. A step lost
RUN_MAX_STARTS times in a row (a file that kills the parser's process, a database down
for longer than the tries span) ends the job in error.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from datetime import timedelta
from typing import Any

from celery import Task, current_app
from django.conf import settings
from django.utils import timezone

from agentbus import ProjectGone, live_workers, project_gone, publish, queue_depth
from workspaces.redis import ScopedRedis, scoped

from . import job_records
from .chunking import document_point_keys
from .job_records import ENDED
from .models import ContextDocument

logger = logging.getLogger(__name__)

FORGET_TASK = "context.forget_document"


def step_publish(
    task: Task,
    *,
    redis: ScopedRedis,
    project_id: uuid.UUID | str,
    job_id: str,
    after: str,
    kwargs: dict[str, Any],
    holder: str | None = None,
) -> bool:
    """Put the job's next step (`task` with `kwargs`) on the project's bus in place of
    step `after` (job_records.step_next); False when `after` is no longer owed (nothing
    is sent) or the project is being deleted. Raises while Redis or the broker is down:
    the step stays owed, and the recovery pass sends it."""
    token = job_records.step_next(
        redis=redis, job_id=job_id, after=after, task=task.name, kwargs=kwargs, holder=holder
    )
    if token is None:
        return False
    try:
        publish(task, project_id=project_id, kwargs={**kwargs, "step": token})
    except ProjectGone:
        return False  # its teardown removes the job
    return True


def step_give_back(task_kwargs: dict[str, Any], exc: BaseException) -> None:
    """A step's task failed with `exc`: give the step back for the pass to send again
    (only the exception's class is kept with the job: its reader is the tenant, and the
    worker's log has the rest). While Redis is down this fails too; the worker's first
    heartbeat after the outage makes it a new incarnation (agentbus.worker), and the
    pass sends again the steps its old one held."""
    try:
        job_records.step_given_back(
            redis=scoped(task_kwargs["user_id"], task_kwargs["project_id"]),
            job_id=task_kwargs["job_id"],
            step=task_kwargs.get("step", ""),
            error=type(exc).__name__,
        )
    except Exception:
        logger.warning("context job %s: its failed step could not be given back",
                       task_kwargs.get("job_id"), exc_info=True)  # fmt: skip


def jobs_recover(*, budget: float | None = None, limit: int = 500) -> dict[str, int]:
    """The recovery pass over context jobs (see the module docstring); returns what it
    did. Past `budget` seconds (default RUN_RECOVERY_SECONDS) it stops between jobs and
    the next pass goes on (`unfinished`)."""
    deadline = time.monotonic() + (settings.RUN_RECOVERY_SECONDS if budget is None else budget)
    done = {"redone": 0, "failed": 0, "forgotten": 0}
    members = job_records.index_members(limit)
    if not members:
        return done
    live = {worker["id"] for worker in live_workers()}
    depths: dict[uuid.UUID, int] = {}
    looked_at: list[str] = []
    for member in members:
        if time.monotonic() >= deadline:
            done["unfinished"] = 1
            break
        looked_at.append(member)
        parsed = job_records.index_parse(member)
        if parsed is None:
            job_records.index_forget(member)
            continue
        user_id, project_id, job_id = parsed
        redis = scoped(user_id, project_id)
        job = job_records.job_get(redis=redis, job_id=job_id)
        if job is None or job.get("status") in ENDED or "next" not in job:
            job_records.index_forget(member)  # ended, or gone with its workspace
            done["forgotten"] += 1
            continue
        if project_gone(project_id):
            continue  # being deleted: its teardown removes the job
        holder = job.get("holder", "")
        if holder == job_records.GIVEN_BACK:
            wait = settings.RUN_REDISPATCH_SECONDS * 2 ** int(job.get("lost", 0))
            if time.time() - float(job.get("failed_at", 0)) < wait:
                continue
        elif holder:
            if holder in live:
                continue
        elif time.time() - float(job.get("stepped_at", 0)) < settings.RUN_REDISPATCH_SECONDS:
            continue
        else:
            if project_id not in depths:
                depths[project_id] = queue_depth(project_id)
            if depths[project_id]:
                continue  # its message may be among those waiting
        try:
            done[_step_again(redis=redis, user_id=user_id, project_id=project_id, job=job,
                             holder=holder)] += 1  # fmt: skip
        except Exception:
            logger.warning("context job %s: not sent again; the next pass tries", job_id)
    job_records.index_looked_at(looked_at)  # (the forgotten ones are not added back)
    if done["redone"] or done["failed"]:
        logger.warning("context job recovery: %s", done)
    return done


def _step_again(
    *, redis: ScopedRedis, user_id: int, project_id: uuid.UUID, job: dict[str, Any], holder: str
) -> str:
    """Send the job's lost step again, or end the job when that step was lost
    RUN_MAX_STARTS times; "redone", "failed" or "forgotten" (it moved on meanwhile)."""
    step, owed = job["next"], job.get("step", "")
    if int(job.get("lost", 0)) + 1 < settings.RUN_MAX_STARTS:
        sent = step_publish(
            current_app.tasks[step["task"]],
            redis=redis,
            project_id=project_id,
            job_id=job["id"],
            after=owed,
            kwargs=step["kwargs"],
            holder=holder,
        )
        return "redone" if sent else "forgotten"
    # Taken from the step first (a token no task carries), so no worker goes on with it.
    if not job_records.step_next(redis=redis, job_id=job["id"], after=owed, holder=holder, **step):
        return "forgotten"
    if holder == job_records.GIVEN_BACK:
        error = (
            f"the job's step was tried {settings.RUN_MAX_STARTS} times and given up; "
            f"the last try failed with {job.get('failed', 'an error')}"
        )
    else:
        error = (
            f"the job lost its worker {settings.RUN_MAX_STARTS} times at the same step "
            "and was given up"
        )
    document_id = job.get("document_id")
    if document_id:  # nothing of a file is left half-stored
        ContextDocument.objects.filter(id=document_id).update(
            status=ContextDocument.Status.ERROR, error=error, chunks=0, text=""
        )
        _points_forget_later(user_id=user_id, project_id=project_id, agent_id=job["agent_id"],
                       document_id=document_id, chunks=int(job.get("documents", 0)))  # fmt: skip
    job_records.job_finish(
        redis=redis,
        job_id=job["id"],
        fields={"status": "error", "error": error, "finished_at": time.time()},
    )
    return "failed"


def _points_forget_later(
    *, user_id: int, project_id: uuid.UUID, agent_id: str, document_id: str, chunks: int
) -> None:
    """Remove, on a worker of the project's bus, the points a document's job may have
    stored (`chunks` of them, named by the document and the chunk's index)."""
    if not chunks:
        return
    keys = document_point_keys(document_id=document_id, chunks=chunks)
    with contextlib.suppress(ProjectGone):
        publish(
            current_app.tasks[FORGET_TASK],
            project_id=project_id,
            kwargs={"user_id": user_id, "agent_id": agent_id, "keys": keys},
        )


UNFINISHED = (ContextDocument.Status.QUEUED, ContextDocument.Status.RUNNING)
LOST = "its job was lost (its record in Redis is gone); give the file again to ingest it"


def documents_lost_fail(*, limit: int = 500) -> int:
    """End in error the file documents that read queued or running while their job is
    gone (Redis lost it, or it expired): nothing would ingest them now, and their bytes
    given again queue them again (services.context_file_add). Oldest first, at most
    `limit` a pass; returns how many ended."""
    stale = timezone.now() - timedelta(seconds=settings.RUN_REDISPATCH_SECONDS)
    unfinished = ContextDocument.objects.filter(status__in=UNFINISHED, updated_at__lt=stale)
    ended = 0
    for document in unfinished.select_related("agent__project").order_by("updated_at")[:limit]:
        project = document.agent.project
        redis = scoped(project.owner_id, project.id)
        lost = job_records.file_ingest_failed(
            redis=redis, status=document.status, job_id=document.job_id
        )
        if not lost or project_gone(project.id):
            continue
        # Only if no request queued it again meanwhile (a new job id).
        if not ContextDocument.objects.filter(
            id=document.id, job_id=document.job_id, status__in=UNFINISHED
        ).update(status=ContextDocument.Status.ERROR, error=LOST, chunks=0, text=""):
            continue
        _points_forget_later(user_id=project.owner_id, project_id=project.id,
                       agent_id=str(document.agent_id), document_id=str(document.id),
                       chunks=document.chunks)  # fmt: skip
        ended += 1
    if ended:
        logger.warning("context documents whose job was lost: %d ended in error", ended)
    return ended
