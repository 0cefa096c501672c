"""Operators' pages: runs in the admin (one query per page, not per row; a run's
timeline, usage and links), names beside ids, the dashboards drawn from the rollups,
metrics as Prometheus asks for them, the quota form in words."""

from __future__ import annotations

import uuid
from datetime import timedelta
from urllib.parse import urlencode

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families
from rest_framework.test import APIClient

from chat.models import Message, Run
from governance.models import AuditEvent, Quota, RunUsage
from observability.models import DEPLOYMENT, MinuteRollup
from observability.services import percentile, rollup_minutes
from tests.factories import AgentFactory, ChatSessionFactory, ProjectFactory, UserFactory


@pytest.fixture
def staff(client, db):
    user = UserFactory(is_staff=True, is_superuser=True)
    client.force_login(user)
    return client


def make_run(session, *, status=Run.Status.DONE, model="gpt-x", steps=(), error="", ago=0,
             tokens=(10, 5)):  # fmt: skip
    now = timezone.now() - timedelta(seconds=ago)
    message = Message.objects.create(session=session, role="assistant", status=status)
    run = Run.objects.create(
        session=session, message=message, agent=session.agent, status=status, model=model,
        steps=list(steps), error=error, trace_id="ab" * 16,
    )  # fmt: skip
    Run.objects.filter(id=run.id).update(
        created_at=now - timedelta(seconds=2),
        started_at=now - timedelta(seconds=1.5),
        first_token_at=now - timedelta(seconds=1),
        finished_at=now,
    )
    if tokens:
        RunUsage.objects.create(
            run_id=run.id, project_id=session.project_id, user=session.project.owner,
            agent_id=session.agent_id, message_id=message.id, model=model,
            prompt_tokens=tokens[0], completion_tokens=tokens[1],
            total_tokens=sum(tokens), outcome=status, created_at=now, day=now.date(),
            recorded_at=now,
        )  # fmt: skip
    run.refresh_from_db()
    return run


def test_the_run_list_costs_the_same_queries_for_5_runs_as_for_40(staff, session):
    other = ChatSessionFactory(agent=AgentFactory(project=ProjectFactory()))
    for i in range(5):
        make_run(session if i % 2 else other, ago=i)
    with CaptureQueriesContext(connection) as few:
        response = staff.get("/admin/chat/run/")
    assert response.status_code == 200
    body = response.content.decode()
    assert session.project.name in body and other.project.name in body
    for i in range(35):
        make_run(session, ago=10 + i, model="gpt-y" if i % 2 else "gpt-x")
    with CaptureQueriesContext(connection) as many:
        response = staff.get("/admin/chat/run/")
    assert response.status_code == 200
    assert len(many.captured_queries) == len(few.captured_queries), [
        q["sql"] for q in many.captured_queries
    ]


def test_the_run_list_filters_by_project_agent_status_model_and_time(staff, session):
    mine = make_run(session, model="gpt-x")
    failed = make_run(session, model="gpt-y", status=Run.Status.ERROR, error="boom")
    other = make_run(ChatSessionFactory(agent=AgentFactory(project=ProjectFactory())))

    def listed(query: str) -> set[str]:
        response = staff.get(f"/admin/chat/run/?{query}")
        assert response.status_code == 200
        return {str(r.pk) for r in response.context["cl"].result_list}

    assert listed(f"project={session.project_id}") == {str(mine.id), str(failed.id)}
    assert listed(f"project={session.project_id}&agent={session.agent_id}") == {
        str(mine.id), str(failed.id)
    }  # fmt: skip
    assert listed("status__exact=error") == {str(failed.id)}
    assert listed("model=gpt-y") == {str(failed.id)}
    # Yesterday's start with its offset, as the admin's date filter links give it (a bare
    # date would be a naive datetime to the lookup).
    since = timezone.localtime() - timedelta(days=1)
    since = since.replace(hour=0, minute=0, second=0, microsecond=0)
    assert str(other.id) in listed(urlencode({"created_at__gte": since}))
    # The agent filter offers the chosen project's agents only.
    page = staff.get(f"/admin/chat/run/?project={session.project_id}").content.decode()
    assert f"agent={session.agent_id}" in page


def test_a_run_page_shows_its_timeline_usage_error_and_links(staff, session):
    steps = [
        {"type": "tool", "attempt": 1, "step": 1, "call_id": "c1", "name": "weather",
         "arguments": '{"city": "Oslo"}', "status": "done", "result": "sunny",
         "started_at": timezone.now().isoformat(), "finished_at": timezone.now().isoformat()},
        {"type": "tool", "attempt": 1, "step": 1, "call_id": "c2", "name": "calendar",
         "arguments": "{}", "status": "error", "result": "error: HTTP 500",
         "started_at": timezone.now().isoformat(), "finished_at": timezone.now().isoformat()},
    ]  # fmt: skip
    run = make_run(session, steps=steps, status=Run.Status.ERROR, error="the model failed")
    AuditEvent.objects.create(
        project_id=session.project_id, username="x", credential="token", method="POST",
        path="/x", action="create", status_code=201,
    )  # fmt: skip
    response = staff.get(f"/admin/chat/run/{run.id}/change/")
    assert response.status_code == 200
    page = response.content.decode()
    for text in ("step 1: weather", "step 1: calendar", "sunny", "error: HTTP 500",
                 "the model failed", run.trace_id, "accepted", "ended error"):  # fmt: skip
        assert text in page, text
    for url in (
        f"/admin/projects/project/{session.project_id}/change/",
        f"/admin/chat/chatsession/{session.id}/change/",
        f"/admin/chat/message/{run.message_id}/change/",
        f"/admin/governance/runusage/{run.id}/change/",
        f"/admin/governance/auditevent/?project_id={session.project_id}",
    ):
        assert url in page, url
    assert (
        staff.get(f"/admin/governance/auditevent/?project_id={session.project_id}").status_code
        == 200
    )
    assert staff.get("/admin/chat/run/not-a-uuid/change/").status_code in (302, 404)


def test_usage_and_audit_lists_show_project_names_in_one_query(staff, session):
    for i in range(3):
        make_run(session, ago=i)
    gone = uuid.uuid4()
    AuditEvent.objects.create(
        project_id=gone, username="x", credential="token", method="POST", path="/x",
        action="create", status_code=201,
    )  # fmt: skip
    AuditEvent.objects.create(
        project_id=session.project_id, username="x", credential="token", method="POST",
        path="/x", action="create", status_code=201,
    )  # fmt: skip
    with CaptureQueriesContext(connection) as three:
        usage = staff.get("/admin/governance/runusage/").content.decode()
    assert session.project.name in usage and str(session.project_id)[:8] in usage
    # The agent's name beside its id, from the same query whatever the rows.
    assert session.agent.name in usage and str(session.agent_id)[:8] in usage
    for i in range(6):
        make_run(session, ago=i + 3)
    with CaptureQueriesContext(connection) as nine:
        assert staff.get("/admin/governance/runusage/").status_code == 200
    assert len(nine.captured_queries) == len(three.captured_queries)
    with CaptureQueriesContext(connection) as few:
        audit = staff.get("/admin/governance/auditevent/").content.decode()
    assert session.project.name in audit and "(deleted)" in audit
    for i in range(6):
        AuditEvent.objects.create(
            project_id=ProjectFactory().id, username="x", credential="token", method="POST",
            path=f"/x{i}", action="create", status_code=201,
        )  # fmt: skip
    with CaptureQueriesContext(connection) as many:
        assert staff.get("/admin/governance/auditevent/").status_code == 200
    assert len(many.captured_queries) == len(few.captured_queries)


def test_the_quota_form_explains_itself(staff):
    response = staff.post("/admin/governance/quota/add/", {"tokens_per_day": "100"})
    assert response.status_code == 200
    page = response.content.decode()
    assert "quota_project_xor_user" not in page
    assert "Choose the project or the user these limits are for." in page
    assert "Prompt + completion tokens per UTC day" in page
    assert not Quota.objects.exists()
    project, user = ProjectFactory(), UserFactory()
    both = staff.post(
        "/admin/governance/quota/add/", {"project": project.pk, "user": user.pk}
    ).content.decode()
    assert "not both" in both and "quota_project_xor_user" not in both
    assert not Quota.objects.exists()


def test_percentile_is_nearest_rank():
    assert percentile([], 50) is None
    assert percentile([5], 95) == 5
    assert percentile(list(range(1, 101)), 50) == 50
    assert percentile(list(range(1, 101)), 95) == 95


def test_rollups_and_the_dashboards_drawn_from_them(staff, session):
    now = timezone.now()
    for _ in range(4):
        make_run(session, ago=65, tokens=(100, 20))
    make_run(session, ago=65, status=Run.Status.ERROR, tokens=(1, 0))
    written = rollup_minutes(now=now + timedelta(seconds=0))
    assert written >= 2
    minute = (now - timedelta(seconds=65)).replace(second=0, microsecond=0)
    project_row = MinuteRollup.objects.get(project_id=session.project_id, minute=minute)
    deployment = MinuteRollup.objects.get(project_id=DEPLOYMENT, minute=minute)
    for row in (project_row, deployment):
        assert (row.runs, row.errors, row.prompt_tokens, row.completion_tokens) == (5, 1, 401, 80)
        assert row.ttft_p50_ms == 1000 and row.queue_wait_p95_ms == 500
    # Idempotent: a second pass over the same minutes writes the same figures.
    rollup_minutes(now=now)
    assert MinuteRollup.objects.get(project_id=DEPLOYMENT, minute=minute).runs == 5

    with CaptureQueriesContext(connection) as queries:
        page = staff.get("/admin/dashboard/")
    assert page.status_code == 200
    body = page.content.decode()
    assert "/static/observability/vendor/chart.umd.min.js" in body and "cdn" not in body.lower()
    assert page.context["series"]["totals"]["runs"] >= 5
    assert len(queries.captured_queries) < 15
    project_page = staff.get(f"/admin/dashboard/projects/{session.project_id}/?hours=24")
    assert project_page.status_code == 200
    assert session.project.name in project_page.content.decode()
    assert project_page.context["series"]["totals"]["errors"] == 1
    assert len(project_page.context["series"]["labels"]) == 24 * 60
    assert staff.get(f"/admin/dashboard/projects/{uuid.uuid4()}/").status_code == 404
    assert staff.get("/admin/dashboard/?hours=abc").status_code == 200


def test_dashboards_are_for_staff_only(client, user, session):
    assert client.get("/admin/dashboard/").status_code == 302  # to the login page
    client.force_login(user)
    assert client.get(f"/admin/dashboard/projects/{session.project_id}/").status_code == 302


@pytest.mark.parametrize("path", ["/admin/metrics", "/admin/metrics/"])
def test_metrics_answer_prometheus_accept_header_without_redirect(db, path, session):
    staff = APIClient()
    staff.force_authenticate(UserFactory(is_staff=True))
    anonymous = APIClient()
    assert anonymous.get(path, HTTP_ACCEPT="text/plain").status_code == 401
    prometheus_accept = (
        "application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
    )
    for accept in ("text/plain", prometheus_accept, "*/*"):
        response = staff.get(path, HTTP_ACCEPT=accept)
        assert response.status_code == 200, (accept, response.content)
        assert response["Content-Type"].startswith("text/plain")
    # HTTP and process metrics beside the per-project ones; names beside project ids.
    staff.get("/admin/workspaces/stats")
    text = staff.get(path, HTTP_ACCEPT="text/plain").content.decode()
    names = {family.name for family in text_string_to_metric_families(text)}
    assert {"uws_project_runs_24h", "uws_http_requests", "uws_http_request_duration_seconds",
            "process_cpu_seconds", "uws_project_info"} <= names, names  # fmt: skip
    assert 'route="admin/workspaces/stats"' in text
