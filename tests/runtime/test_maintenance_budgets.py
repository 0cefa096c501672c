"""Maintenance tasks keep time limits of their own (common.budget): the worker's thread
pool does not enforce Celery's, so a periodic task over rows stops at its budget, between
two units of work, and the next tick goes on."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from agentbus import MAINTENANCE_QUEUE
from chat.models import Run
from chat.suspend import runs_waiting_recover
from config.celery_app import app
from governance.audit import audit_purge
from governance.models import AuditEvent
from tests.factories import AgentFactory, ChatSessionFactory, ProjectFactory
from tests.workers import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]


def old_audit_records(n: int) -> None:
    AuditEvent.objects.bulk_create(
        AuditEvent(
            created_at=timezone.now() - timedelta(days=400),
            credential="token",
            method="PATCH",
            path=f"/{i}/",
            action="PATCH",
        )
        for i in range(n)
    )


def test_the_audit_purge_on_a_worker_stops_at_its_budget_and_the_next_run_goes_on(
    worker_process,
):
    old_audit_records(35)
    # The Procfile's pool; a budget spent at once: one batch per run.
    worker = worker_process(
        "-Q", MAINTENANCE_QUEUE, "-P", "threads", "-c", "4",
        env={"AUDIT_PURGE_BATCH": "10", "AUDIT_PURGE_BUDGET_SECONDS": "0"},
    )  # fmt: skip
    worker.wait_ready()
    stopped = "audit purge: 10 deleted, out of time; the next run goes on"
    for runs, left in ((1, 25), (2, 15)):
        # As beat sends it (results are not kept: the task's own log line says it ended).
        app.send_task("governance.purge_audit")
        wait_until(
            lambda runs=runs: worker.log().count(stopped) == runs,
            timeout=60,
            what=f"purge run {runs} stopped at its budget",
        )
        assert AuditEvent.objects.count() == left
    # With time enough, one run takes what is left.
    assert audit_purge(batch=10, budget_seconds=60) == 15
    assert not AuditEvent.objects.exists()


def test_the_waiting_runs_pass_stops_at_its_budget_and_the_next_pass_goes_on(settings):
    project = ProjectFactory()
    agent = AgentFactory(project=project)
    late = timezone.now() - timedelta(seconds=5)
    runs = []
    for _ in range(3):
        session = ChatSessionFactory(agent=agent, project=project)
        message = session.messages.create(role="assistant", content="", status="streaming")
        runs.append(
            Run.objects.create(
                session=session,
                message=message,
                agent=agent,
                status="waiting",
                waiting_until=late,
            )
        )
    first = runs_waiting_recover(budget=0)
    assert first["waits_expired"] == 1 and first["unfinished"] == 1
    assert Run.objects.filter(id__in=[r.id for r in runs], status="waiting").count() == 2
    second = runs_waiting_recover(budget=60)
    assert second["waits_expired"] == 2 and "unfinished" not in second
    assert not Run.objects.filter(id__in=[r.id for r in runs], status="waiting").exists()
