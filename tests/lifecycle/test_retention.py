"""Retention: deployment defaults and a project's own periods (API), and the sweep that
removes what they let go in bounded chunks, reports it, and keeps usage and quotas
right by rolling raw usage up first."""

from __future__ import annotations

import uuid
from datetime import date, timedelta

import pytest
from celery import current_app
from django.utils import timezone

from chat import streams
from chat.models import ChatSession, Message, Run
from governance.models import EmbeddingUsage, RunUsage, UsageDaily
from governance.quotas import Scope, scope_state
from governance.selectors import usage_summary
from lifecycle.models import RetentionPolicy, RetentionReport
from lifecycle.retention import retention_sweep
from tests.factories import AgentFactory, ChatSessionFactory, ProjectFactory
from tests.workers import wait_until
from workspaces.redis import scoped


def url(project):
    return f"/my/projects/{project.id}/retention/"


def test_policy_follows_the_deployment_until_the_project_sets_its_own(api, project, settings):
    settings.RETENTION_SESSIONS_DAYS = 90
    body = api.get(url(project)).json()
    assert body["own"]["sessions_days"] is None and body["effective"]["sessions_days"] == 90
    response = api.put(url(project), {"sessions_days": 7, "usage_days": 0}, format="json")
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["effective"]["sessions_days"] == 7 and body["effective"]["usage_days"] == 0
    body = api.put(url(project), {"sessions_days": None}, format="json").json()
    assert body["effective"]["sessions_days"] == 90 and body["own"]["usage_days"] == 0


@pytest.mark.parametrize(
    "body",
    [{"sessions_days": -1}, {"sessions_days": "7"}, {"sessions_days": True},
     {"sessions_days": 7.5}, {"forever": 1}, {"sessions_days": 10**9}],
)  # fmt: skip
def test_bad_periods_are_a_400_and_write_nothing(api, project, body):
    response = api.put(url(project), body, format="json")
    assert response.status_code == 400, response.content
    assert not RetentionPolicy.objects.exists()


def test_retention_is_the_owners_alone(api, other_api, project):
    assert other_api.get(url(project)).status_code == 404
    assert other_api.put(url(project), {"sessions_days": 1}, format="json").status_code == 404
    key = api.post(f"/my/projects/{project.id}/keys/", {"name": "k", "scopes": ["read", "write"]},
                   format="json").json()["key"]  # fmt: skip
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    assert api.get(url(project)).status_code == 200
    assert api.put(url(project), {"sessions_days": 1}, format="json").status_code == 403
    assert not RetentionPolicy.objects.exists()


def aged(session: ChatSession, *, days: int, messages: int) -> list[Message]:
    """`messages` question/answer pairs in `session`, the last one `days` ago."""
    made = []
    for i in range(messages):
        asked = Message.objects.create(session=session, role="user", content=f"q{i}")
        answer = Message.objects.create(session=session, role="assistant", content=f"a{i}")
        Run.objects.create(session=session, message=answer, agent=session.agent, status="done",
                           steps=[{"tool": "x", "result": "big"}],
                           finished_at=timezone.now())  # fmt: skip
        made += [asked, answer]
    when = timezone.now() - timedelta(days=days)
    Message.objects.filter(id__in=[m.id for m in made]).update(created_at=when)
    Run.objects.filter(message__in=made).update(finished_at=when)
    ChatSession.objects.filter(id=session.id).update(created_at=when)
    return made


def usage_rows(project, *, day: date, n: int) -> None:
    for i in range(n):
        RunUsage.objects.create(
            run_id=uuid.uuid4(), project_id=project.id, user=project.owner,
            agent_id=uuid.uuid4() if i % 2 else uuid.UUID(int=1), message_id=i,
            model="m", prompt_tokens=10, completion_tokens=5, total_tokens=15, tool_calls=1,
            latency_ms=100 + i, created_at=timezone.now(), day=day, recorded_at=timezone.now(),
        )  # fmt: skip
    EmbeddingUsage.objects.create(project_id=project.id, user=project.owner,
                                  agent_id=uuid.UUID(int=1), job_id=str(uuid.uuid4()),
                                  batch_start=0, model="e", tokens=40, day=day)  # fmt: skip


def test_the_sweep_removes_in_chunks_what_each_policy_lets_go(
    db, settings, redis_client, django_capture_on_commit_callbacks
):
    settings.RETENTION_SESSIONS_DAYS = 30  # the deployment's default
    settings.RETENTION_RUN_STEPS_DAYS = 0
    project = ProjectFactory()
    agent = AgentFactory(project=project)
    old = ChatSessionFactory(agent=agent, project=project)
    recent = ChatSessionFactory(agent=agent, project=project)
    aged(old, days=40, messages=12)  # 24 messages
    aged(recent, days=3, messages=2)
    # Another project keeps everything; a third keeps its sessions but not run steps.
    keeper = ProjectFactory()
    RetentionPolicy.objects.create(project=keeper, sessions_days=0)
    kept = ChatSessionFactory(agent=AgentFactory(project=keeper), project=keeper)
    aged(kept, days=400, messages=3)
    stepper = ProjectFactory()
    RetentionPolicy.objects.create(project=stepper, sessions_days=0, run_steps_days=10)
    stepped = ChatSessionFactory(agent=AgentFactory(project=stepper), project=stepper)
    aged(stepped, days=20, messages=2)
    # The old session's event stream goes with it.
    redis = scoped(project.owner_id, project.id)
    redis.xadd(streams.stream_key(old.id), {"type": "x", "data": "{}"})

    with django_capture_on_commit_callbacks(execute=True):
        report = retention_sweep(chunk=5, budget_seconds=60)
    assert report.complete and report.finished_at
    assert report.removed["sessions_days"] == 24 + 1  # the messages, then the session
    assert report.removed["run_steps_days"] == 2
    assert report.chunks >= 24 // 5
    assert not ChatSession.objects.filter(id=old.id).exists()
    assert not redis.exists(streams.stream_key(old.id))
    assert Message.objects.filter(session=recent).count() == 4
    assert Message.objects.filter(session=kept).count() == 6
    assert list(Run.objects.filter(session=stepped).values_list("steps", flat=True)) == [[], []]
    assert Run.objects.filter(session=stepped, status="done").count() == 2  # the runs stay
    assert all(Run.objects.filter(session=kept).values_list("steps", flat=True))
    assert RetentionReport.objects.get() == report
    # Nothing more is due: the next sweep removes nothing.
    again = retention_sweep(chunk=5, budget_seconds=60)
    assert not any(again.removed.values())


def test_a_sweep_stops_at_its_budget_and_the_next_goes_on(db, settings):
    settings.RETENTION_SESSIONS_DAYS = 30
    project = ProjectFactory()
    session = ChatSessionFactory(agent=AgentFactory(project=project), project=project)
    aged(session, days=40, messages=10)
    first = retention_sweep(chunk=2, budget_seconds=0)
    assert not first.complete and first.removed["sessions_days"] == 0
    second = retention_sweep(chunk=2, budget_seconds=60)
    assert second.complete and second.removed["sessions_days"] == 21


def test_event_history_is_trimmed_to_the_period(db, settings, redis_client):
    settings.RETENTION_EVENTS_DAYS = 2
    project = ProjectFactory()
    session = ChatSessionFactory(agent=AgentFactory(project=project), project=project)
    Message.objects.create(session=session, role="user", content="recent")
    redis = scoped(project.owner_id, project.id)
    key = streams.stream_key(session.id)
    now_ms = int(timezone.now().timestamp() * 1000)
    for age_days in (5, 3, 1, 0):
        redis.xadd(key, {"type": "x", "data": "{}"}, id=f"{now_ms - age_days * 86_400_000 - 1}-0")
    report = retention_sweep(chunk=100, budget_seconds=60)
    assert report.removed["events_days"] == 2
    assert redis.xlen(key) == 2


def test_raw_usage_is_rolled_up_first_so_usage_and_quotas_stay_right(db, settings):
    project = ProjectFactory()
    today = timezone.now().date()
    first_of_month = today.replace(day=1)
    usage_rows(project, day=first_of_month, n=7)
    usage_rows(project, day=first_of_month - timedelta(days=40), n=3)
    window = {"date_from": today - timedelta(days=90), "date_to": today}
    before = {g: usage_summary(project=project, group_by=g, **window) for g in ("day", "agent")}
    quota_before = scope_state(Scope("project", str(project.id)), timezone.now())

    RetentionPolicy.objects.create(project=project, usage_days=0)
    settings.RETENTION_USAGE_DAYS = 1
    assert retention_sweep(chunk=100, budget_seconds=60).removed["usage_days"] == 0  # own: 0
    RetentionPolicy.objects.filter(project=project).update(usage_days=None)
    report = retention_sweep(chunk=3, budget_seconds=60, now=timezone.now() + timedelta(days=2))
    assert report.removed["usage_days"] == 10
    assert not RunUsage.objects.exists() and not EmbeddingUsage.objects.exists()
    assert UsageDaily.objects.filter(project_id=project.id).exists()

    after = {g: usage_summary(project=project, group_by=g, **window) for g in ("day", "agent")}
    assert after == before
    quota_after = scope_state(Scope("project", str(project.id)), timezone.now())
    assert quota_after["tokens_per_month"] == quota_before["tokens_per_month"] == 7 * 15
    assert quota_after["tokens_per_day"] == quota_before["tokens_per_day"]


@pytest.mark.slow
def test_beat_sends_the_sweep_to_a_worker(live_worker, settings):
    settings.RETENTION_SESSIONS_DAYS = 30
    project = ProjectFactory()
    session = ChatSessionFactory(agent=AgentFactory(project=project), project=project)
    aged(session, days=31, messages=1)
    entry = settings.CELERY_BEAT_SCHEDULE["lifecycle.retention_sweep"]
    current_app.send_task(entry["task"], **entry["options"])
    wait_until(lambda: RetentionReport.objects.filter(complete=True).exists(), what="a sweep")
    assert not ChatSession.objects.filter(id=session.id).exists()
