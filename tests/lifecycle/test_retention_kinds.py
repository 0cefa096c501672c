"""Retention kinds of other apps: what agents remember of ended sessions (their
exchanges in the vector store) and webhook deliveries (once automation's own purge),
each with the deployment's default and a project's own period, counted by the report."""

from __future__ import annotations

import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from django.utils import timezone

from automation.models import ScheduleFire, WebhookAttempt, WebhookDelivery, WebhookEndpoint
from automation.schedules import schedule_create
from automation.tasks import purge
from chat.models import Message
from context.vectors import exchange_store, exchanges_before
from lifecycle.models import RetentionPolicy
from lifecycle.retention import retention_sweep
from tests.factories import AgentFactory, ChatSessionFactory, ProjectFactory

pytestmark = pytest.mark.slow  # embeds with the bundled model


def remembered(agent) -> dict[str, str | None]:
    """The agent's remembered exchanges: point id -> session id."""
    return dict(
        exchanges_before(user_id=agent.project.owner_id, project_id=agent.project_id,
                         agent_id=str(agent.id), before=float("inf"))
    )  # fmt: skip


def on_disk(folder: str) -> bytes:
    """Every byte of the files under the vector store's folder."""
    return b"".join(path.read_bytes() for path in Path(folder).rglob("*") if path.is_file())


def remember(agent, session_id, question: str) -> None:
    exchange_store(user_id=agent.project.owner_id, project_id=agent.project_id,
                   agent_id=str(agent.id), question=question, answer="yes",
                   payload={"session_id": str(session_id), "message_id": 1})  # fmt: skip


def test_context_of_ended_sessions_goes_and_of_live_ones_stays(db, settings, runtime_settings):
    settings.RETENTION_SESSION_CONTEXT_DAYS = 0  # the deployment keeps it forever
    project = ProjectFactory()
    RetentionPolicy.objects.create(project=project, session_context_days=30)
    agent, other_agent = AgentFactory(project=project), AgentFactory(project=project)
    ended = ChatSessionFactory(agent=agent, project=project)
    live = ChatSessionFactory(agent=agent, project=project)
    Message.objects.create(session=ended, role="user", content="old")
    later = Message.objects.create(session=live, role="user", content="new")
    for i in range(3):
        remember(agent, ended.id, f"ended {i}")
        remember(other_agent, ended.id, f"ended too {i}")
    remember(agent, live.id, "live")
    remember(agent, uuid.uuid4(), "of a session long deleted")
    # Another project follows the deployment: it keeps everything.
    keeper = ProjectFactory()
    kept_agent = AgentFactory(project=keeper)
    kept_session = ChatSessionFactory(agent=kept_agent, project=keeper)
    remember(kept_agent, kept_session.id, "kept")

    # 40 days on, the live session had a message 20 days ago; the ended one none since.
    now = timezone.now() + timedelta(days=40)
    Message.objects.filter(id=later.id).update(created_at=now - timedelta(days=20))
    assert b"ended too 0" in on_disk(settings.QDRANT_PATH)
    report = retention_sweep(chunk=2, budget_seconds=120, now=now)
    assert report.complete
    assert report.removed["session_context_days"] == 3 + 3 + 1
    # Gone from the disk too, not only from the index.
    assert b"ended too 0" not in on_disk(settings.QDRANT_PATH)
    assert list(remembered(agent).values()) == [str(live.id)]
    assert remembered(other_agent) == {}
    assert list(remembered(kept_agent).values()) == [str(kept_session.id)]
    again = retention_sweep(chunk=2, budget_seconds=120, now=now)
    assert again.removed["session_context_days"] == 0


def delivery(endpoint, *, days: int, status: str, attempts: int = 1) -> WebhookDelivery:
    made = WebhookDelivery.objects.create(
        id=f"msg_{uuid.uuid4().hex}", endpoint=endpoint, event_type="run.completed",
        body="{}", status=status,
    )  # fmt: skip
    for n in range(attempts):
        WebhookAttempt.objects.create(delivery=made, number=n + 1, status_code=500)
    WebhookDelivery.objects.filter(id=made.id).update(
        created_at=timezone.now() - timedelta(days=days)
    )
    return made


def endpoint_of(project) -> WebhookEndpoint:
    return WebhookEndpoint.objects.create(project=project, url="https://example.com/hook",
                                          events=["run.completed"], secret="whsec_x")  # fmt: skip


def test_webhook_deliveries_follow_one_policy_with_the_old_default(db, settings):
    assert settings.RETENTION_WEBHOOK_DELIVERIES_DAYS == 7  # the purge's week
    project, keeper, shorter = ProjectFactory(), ProjectFactory(), ProjectFactory()
    RetentionPolicy.objects.create(project=keeper, webhook_deliveries_days=0)
    RetentionPolicy.objects.create(project=shorter, webhook_deliveries_days=1)
    endpoint = endpoint_of(project)
    old = [delivery(endpoint, days=8, status=s, attempts=2) for s in ("delivered", "failed") * 3]
    pending = delivery(endpoint, days=30, status="pending")
    recent = delivery(endpoint, days=3, status="delivered")
    kept = delivery(endpoint_of(keeper), days=400, status="delivered")
    short = delivery(endpoint_of(shorter), days=3, status="failed")

    # Automation's own purge leaves them to the retention sweep now.
    assert purge() == {"idempotency_keys": purge()["idempotency_keys"]}
    assert WebhookDelivery.objects.count() == 10

    report = retention_sweep(chunk=4, budget_seconds=60)
    assert report.removed["webhook_deliveries_days"] == len(old) + 1
    left = set(WebhookDelivery.objects.values_list("id", flat=True))
    assert left == {pending.id, recent.id, kept.id}
    assert not WebhookAttempt.objects.filter(delivery_id__in=[d.id for d in old]).exists()
    assert short.id not in left
    assert retention_sweep(chunk=4, budget_seconds=60).removed["webhook_deliveries_days"] == 0


def test_the_new_kinds_are_in_the_api(api, project, settings):
    settings.RETENTION_SESSION_CONTEXT_DAYS = 0
    url = f"/my/projects/{project.id}/retention/"
    body = api.get(url).json()
    assert body["own"]["session_context_days"] is None
    assert body["effective"]["webhook_deliveries_days"] == 7
    assert body["effective"]["session_context_days"] == 0
    response = api.put(url, {"session_context_days": 14, "webhook_deliveries_days": 0},
                       format="json")  # fmt: skip
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["effective"] == {**body["effective"], "session_context_days": 14,
                                 "webhook_deliveries_days": 0}  # fmt: skip
    bad = api.put(url, {"webhook_deliveries_days": -1}, format="json")
    assert bad.status_code == 400
    assert RetentionPolicy.objects.get(project=project).webhook_deliveries_days == 0


def test_schedule_fires_go_after_their_period_but_each_schedules_latest(db, settings):
    """A `* * * * *` schedule makes 1,440 firings a day: they go after
    RETENTION_SCHEDULE_FIRES_DAYS, except each schedule's latest, which the recovery
    pass of missed ticks counts from (without it, the pass would take the ticks since
    the schedule was made for missed ones)."""
    settings.RETENTION_SCHEDULE_FIRES_DAYS = 30
    agent = AgentFactory()
    ticking = schedule_create(project=agent.project, agent=agent, name="t", content="x",
                              kind="cron", cron="* * * * *")  # fmt: skip
    quiet = schedule_create(project=agent.project, agent=agent, name="q", content="x",
                            kind="cron", cron="0 0 1 * *")  # fmt: skip
    now = timezone.now().replace(second=0, microsecond=0)
    for schedule, ages in ((ticking, [40, 35, 31, 29, 1]), (quiet, [90, 60])):
        for days in ages:
            fire = ScheduleFire.objects.create(schedule=schedule, outcome="sent",
                                               tick=now - timedelta(days=days))  # fmt: skip
            ScheduleFire.objects.filter(id=fire.id).update(fired_at=fire.tick)

    report = retention_sweep(chunk=2, budget_seconds=60)
    assert report.removed["schedule_fires_days"] == 3 + 1
    ticks = {(f.schedule_id, (now - f.tick).days) for f in ScheduleFire.objects.all()}
    assert ticks == {(ticking.id, 29), (ticking.id, 1), (quiet.id, 60)}
    assert retention_sweep(chunk=2, budget_seconds=60).removed["schedule_fires_days"] == 0
