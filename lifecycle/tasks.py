"""Lifecycle tasks: thin, by id, tolerant of the row being gone."""

from celery import Task, shared_task

from agentbus import AgentBusTask, worker_identity

from .accounts import (
    ERASE_TASK,
    account_erasure_dispatch,
    account_erasure_finish,
    account_erasures_owed,
)
from .exports import EXPORT_TASK, IMPORT_TASK, export_run, import_run
from .recovery import archive_job_give_back, archive_jobs_recover
from .retention import retention_sweep

# How long a deleted user's erasure waits between looks at their projects' teardowns.
ERASE_RETRY_SECONDS = 2.0
ERASE_MAX_RETRIES = 300


@shared_task(name=ERASE_TASK, bind=True, max_retries=ERASE_MAX_RETRIES)
def erase_account(self, *, user_id: int) -> bool:
    if not account_erasure_finish(user_id=user_id):
        # Teardowns still owed (they retry while a backend is down); the sweep sends
        # this again if the retries run out.
        raise self.retry(countdown=ERASE_RETRY_SECONDS)
    return True


@shared_task(name="lifecycle.retention_sweep")
def sweep_retention() -> dict:
    for user_id in account_erasures_owed():
        account_erasure_dispatch(user_id=user_id)
    report = retention_sweep()
    return {"removed": report.removed, "complete": report.complete, "chunks": report.chunks}


# An archive job's task says which worker runs it, and gives the job back when it fails:
# lifecycle.recovery sends it again then, or once that worker stops beating.
class _GivesBackOnFailure:
    def on_failure(self, exc, task_id, args, kwargs, einfo):
        archive_job_give_back(job_id=kwargs["job_id"], attempt=kwargs.get("attempt"))


class ExportTask(_GivesBackOnFailure, AgentBusTask):
    pass


class ImportTask(_GivesBackOnFailure, Task):
    pass


@shared_task(base=ExportTask, name=EXPORT_TASK, bind=True)
def export_project(
    self, *, job_id: str, attempt: int | None = None, project_id: str | None = None
) -> str | None:
    worker = worker_identity(self.request.hostname)
    job = export_run(job_id=job_id, attempt=attempt, worker=worker)
    return job.status if job else None


@shared_task(base=ImportTask, name=IMPORT_TASK, bind=True)
def import_project(self, *, job_id: str, attempt: int | None = None) -> str | None:
    worker = worker_identity(self.request.hostname)
    job = import_run(job_id=job_id, attempt=attempt, worker=worker)
    return job.status if job else None


@shared_task(name="lifecycle.recover_archive_jobs")
def recover_archive_jobs() -> dict:
    return archive_jobs_recover()
