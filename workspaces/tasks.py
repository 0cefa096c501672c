"""Maintenance tasks of workspaces (maintenance queue): teardown and the sweep."""

from __future__ import annotations

import uuid

from celery import shared_task

from . import flow_sync
from .services import TEARDOWN_TASK
from .teardown import workspace_sweep, workspace_teardown_run


@shared_task(
    name=TEARDOWN_TASK,
    bind=True,
    # Retried with exponential backoff (1 s, 2 s, ... up to 30 s, jittered) for as long
    # as Redis, the broker or the vector store is down; the sweep re-dispatches a
    # teardown whose retries stopped (e.g. the broker was down when retrying).
    autoretry_for=(Exception,),
    retry_backoff=1,
    retry_backoff_max=30,
    retry_jitter=True,
    max_retries=None,
)
def teardown_workspace(self, *, user_id: int, project_id: str) -> dict | None:
    return workspace_teardown_run(user_id=user_id, project_id=uuid.UUID(project_id))


@shared_task(name="workspaces.sweep")
def sweep(*, redispatch_after: float | None = None) -> dict:
    return workspace_sweep(redispatch_after=redispatch_after)


@shared_task(name="workspaces.flow_rules_resync")
def flow_rules_resync() -> int:
    return flow_sync.flow_rules_resync()
