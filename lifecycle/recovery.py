"""Archive jobs (exports, imports) outlive their worker.

A worker SIGKILLed mid-export keeps the task's message unacknowledged until the broker's
visibility timeout (an hour) gives it back, and a message lost with Redis, or a publish
that failed after the job's commit, never comes back. The pass (beat, every
RUN_RECOVERY_SECONDS, as the runs' and the context jobs' passes) looks at the jobs not
ended and sends again the task of one

- running on a worker that no longer beats (agentbus.live_workers),
- given back by its task, which failed (the database, Redis or the broker down: the
  tasks' `on_failure`, archive_job_give_back), or
- never started, sent RUN_REDISPATCH_SECONDS ago, while its queue is empty;

under the next attempt number, so the first message, if it ever comes back, finds its
attempt replaced and does nothing. A job sent RUN_MAX_STARTS times (an archive that
kills its worker each time, a database down longer than the tries span) ends in error,
and what it left on disk goes. An export is written again from the start
(to a file of its own per attempt); an import goes on (exports.import_run).
"""

from __future__ import annotations

import contextlib
import logging
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import close_old_connections
from django.db.models import F
from django.utils import timezone

from agentbus import (
    MAINTENANCE_QUEUE,
    ProjectGone,
    live_workers,
    project_gone,
    project_queue,
    queue_depth,
)
from common.owed import owe

from .exports import ENDED, archive_job_files_remove, archive_job_send
from .models import ArchiveJob

logger = logging.getLogger(__name__)

# The worker of a job whose task failed (archive_job_give_back): no worker runs it.
GIVEN_BACK = "given-back"


def archive_job_give_back(*, job_id: str, attempt: int | None) -> None:
    """The task of the job's `attempt` failed: if the job is still owed to it, no worker
    runs it now, and the next pass sends it again. While the database is down this
    fails too; the process then tries it again until it goes through (common.owed)."""
    try:
        _given_back(job_id=job_id, attempt=attempt)
    except Exception:
        logger.warning("archive job %s: its failed task could not be given back yet", job_id,
                       exc_info=True)  # fmt: skip
        owe(f"archive job {job_id} given back", lambda: _given_back(job_id=job_id, attempt=attempt))


def _given_back(*, job_id: str, attempt: int | None) -> None:
    close_old_connections()  # the one the failure broke, if it did
    owed = ArchiveJob.objects.filter(id=job_id, attempt=attempt or 1)
    owed.exclude(status__in=ENDED).update(worker=GIVEN_BACK)


def archive_jobs_recover(*, limit: int = 200) -> dict[str, int]:
    """The recovery pass over archive jobs (see the module docstring); what it did."""
    done = {"redone": 0, "failed": 0, "moved": 0}
    owed = list(
        ArchiveJob.objects.exclude(status__in=ENDED).order_by("sent_at")[:limit]
    )  # the partial index archive_job_owed
    if not owed:
        return done
    live = {worker["id"] for worker in live_workers()}
    depths: dict[str, int] = {}
    stale = timezone.now() - timedelta(seconds=settings.RUN_REDISPATCH_SECONDS)
    for job in owed:
        if job.kind == ArchiveJob.Kind.EXPORT and job.project_id and project_gone(job.project_id):
            continue  # being deleted: the job goes with its project
        if job.worker:
            if job.worker in live:
                continue
        elif job.sent_at > stale or _queue_depth(job, depths):
            continue  # its message may be on its way, or among those waiting
        try:
            done[_send_again(job)] += 1
        except Exception:
            logger.warning("archive job %s: not sent again; the next pass tries", job.id)
    if done["redone"] or done["failed"]:
        logger.warning("archive job recovery: %s", done)
    return done


def _queue_depth(job: ArchiveJob, depths: dict[str, int]) -> int:
    """Messages waiting in the job's queue (an export's project's, the maintenance one
    for an import), read once per pass."""
    export = job.kind == ArchiveJob.Kind.EXPORT
    queue = project_queue(job.project_id) if export else MAINTENANCE_QUEUE
    if queue not in depths:
        depths[queue] = queue_depth(queue=queue)
    return depths[queue]


def _send_again(job: ArchiveJob) -> str:
    """Send the job's task under its next attempt, or end the job in error once it was
    sent RUN_MAX_STARTS times: "redone", "failed", or "moved" (it ended or was sent
    again meanwhile)."""
    owed = ArchiveJob.objects.filter(id=job.id, attempt=job.attempt).exclude(status__in=ENDED)
    if job.attempt >= settings.RUN_MAX_STARTS:
        if job.worker == GIVEN_BACK:
            error = f"the job's task failed {job.attempt} times and was given up"
        else:
            error = f"the job lost its worker {job.attempt} times and was given up"
        ended = owed.update(status=ArchiveJob.Status.ERROR, error=error, finished_at=timezone.now())
        if not ended:
            return "moved"
        archive_job_files_remove(job)
        return "failed"
    fields: dict[str, Any] = {"attempt": F("attempt") + 1, "worker": "", "sent_at": timezone.now()}
    if not owed.update(**fields):
        return "moved"
    job.refresh_from_db(fields=["attempt"])
    with contextlib.suppress(ProjectGone):  # being deleted: the job goes with its project
        archive_job_send(job)
    return "redone"
