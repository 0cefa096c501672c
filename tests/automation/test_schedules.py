"""Schedules: the API and its validation, beat's rows (django-celery-beat) following
them, firing through the chat services once per tick, beat's own scheduler deciding a
missed tick is due once, a real beat firing into a real worker, and teardown."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime, timedelta

import pytest
from celery.beat import Service
from django.db import connection, connections
from django.utils import timezone
from django_celery_beat.models import PeriodicTask
from django_celery_beat.schedulers import DatabaseScheduler, ModelEntry

from agentbus.keys import BULK_SUFFIX, FLOW_RULES_KEY
from agentbus.queues import project_queue
from agents.models import Agent
from automation.models import Schedule, ScheduleFire
from automation.schedules import schedule_create, schedule_fire
from chat.models import ChatSession, Message, Run
from chat.services import message_send
from config.celery_app import app
from tests.factories import AgentFactory, ProjectFactory
from tests.workers import wait_until

pytestmark = pytest.mark.django_db(transaction=True)


def _url(project) -> str:
    return f"/my/projects/{project.id}/schedules/"


def _cron_body(agent, **extra) -> dict:
    return {
        "agent_id": str(agent.id),
        "name": "daily digest",
        "content": "Summarise yesterday.",
        "kind": "cron",
        "cron": "30 9 * * 1-5",
        "timezone": "Europe/Berlin",
        **extra,
    }


def test_a_cron_schedule_is_stored_with_its_beat_row(api, agent):
    response = api.post(_url(agent.project), _cron_body(agent), format="json")
    assert response.status_code == 201, response.content
    body = response.json()
    schedule = Schedule.objects.get(id=body["id"])
    assert body["session_id"] == str(schedule.session_id)
    assert ChatSession.objects.get(id=schedule.session_id).agent_id == agent.id
    task = PeriodicTask.objects.get(id=schedule.periodic_task_id)
    assert task.task == "automation.fire_schedule"
    assert json.loads(task.kwargs) == {"schedule_id": str(schedule.id)}
    assert task.queue == "uws.maintenance" and task.enabled and not task.one_off
    crontab = task.crontab
    assert (crontab.minute, crontab.hour, crontab.day_of_week) == ("30", "9", "1-5")
    assert str(crontab.timezone) == "Europe/Berlin"
    assert api.get(_url(agent.project)).json()["schedules"][0]["id"] == body["id"]


def test_a_one_off_schedule_gets_a_clocked_beat_row(api, agent, session):
    at = timezone.now() + timedelta(hours=1)
    response = api.post(
        _url(agent.project),
        {"agent_id": str(agent.id), "session_id": str(session.id), "name": "once",
         "content": "ping", "kind": "once", "run_at": at.isoformat()},
        format="json",
    )  # fmt: skip
    assert response.status_code == 201, response.content
    schedule = Schedule.objects.get(id=response.json()["id"])
    assert schedule.session_id == session.id
    task = schedule.periodic_task
    assert task.one_off and task.clocked.clocked_time == at and task.crontab is None


@pytest.mark.parametrize(
    "change",
    [
        {"cron": "61 * * * *"},
        {"cron": "* * * *"},
        {"cron": "every minute"},
        {"timezone": "Mars/Olympus"},
        {"kind": "weekly"},
        {"kind": "once", "cron": ""},  # no run_at
        {"kind": "once", "run_at": "2001-01-01T00:00:00Z"},  # in the past
        {"kind": "cron", "cron": ""},
        {"surprise": 1},
        {"content": ""},
    ],
)
def test_a_bad_schedule_is_a_400_and_writes_nothing(api, agent, change):
    body = {k: v for k, v in _cron_body(agent, **change).items() if v != ""}
    if change.get("content") == "":
        body["content"] = ""
    response = api.post(_url(agent.project), body, format="json")
    assert response.status_code == 400, response.content
    assert (
        not Schedule.objects.exists()
        and not PeriodicTask.objects.filter(task="automation.fire_schedule").exists()
    )
    assert not ChatSession.objects.exists()


def test_an_agent_or_session_elsewhere_is_a_404(api, agent, user):
    elsewhere = AgentFactory(project=ProjectFactory(owner=user))
    response = api.post(_url(agent.project), _cron_body(elsewhere), format="json")
    assert response.status_code == 404 and "agent_id" in response.json()
    other_session = ChatSession.objects.create(project=elsewhere.project, agent=elsewhere)
    response = api.post(
        _url(agent.project), _cron_body(agent, session_id=str(other_session.id)), format="json"
    )
    assert response.status_code == 404 and "session_id" in response.json()
    assert not Schedule.objects.exists()


def test_another_users_schedules_are_404(api, other_api, agent):
    created = api.post(_url(agent.project), _cron_body(agent), format="json").json()
    base = f"{_url(agent.project)}{created['id']}/"
    assert other_api.get(_url(agent.project)).status_code == 404
    assert other_api.post(_url(agent.project), _cron_body(agent), format="json").status_code == 404
    for method, url in [("get", base), ("patch", base), ("delete", base), ("get", base + "fires/")]:
        assert getattr(other_api, method)(url).status_code == 404, (method, url)
    assert Schedule.objects.count() == 1


def test_a_change_follows_into_beats_row_and_a_delete_removes_it(api, agent):
    created = api.post(_url(agent.project), _cron_body(agent), format="json").json()
    url = f"{_url(agent.project)}{created['id']}/"
    response = api.patch(url, {"cron": "*/5 * * * *", "timezone": "UTC", "enabled": False},
                         format="json")  # fmt: skip
    assert response.status_code == 200, response.content
    task = Schedule.objects.get(id=created["id"]).periodic_task
    assert task.crontab.minute == "*/5" and str(task.crontab.timezone) == "UTC"
    assert not task.enabled
    bad = api.patch(url, {"cron": "nope"}, format="json")
    assert bad.status_code == 400
    assert Schedule.objects.get(id=created["id"]).cron == "*/5 * * * *"
    assert api.delete(url).status_code == 204
    assert not Schedule.objects.exists()
    assert not PeriodicTask.objects.filter(id=task.id).exists()


def test_deleting_the_project_removes_its_schedules_and_beat_rows(api, agent):
    api.post(_url(agent.project), _cron_body(agent), format="json")
    api.post(_url(agent.project), _cron_body(agent, name="second"), format="json")
    assert PeriodicTask.objects.filter(task="automation.fire_schedule").count() == 2
    assert api.delete(f"/my/projects/{agent.project_id}/").status_code == 204
    assert not Schedule.objects.exists()
    assert not PeriodicTask.objects.filter(task="automation.fire_schedule").exists()


def test_a_schedule_creation_takes_an_idempotency_key(api, agent):
    first = api.post(_url(agent.project), _cron_body(agent), format="json",
                     HTTP_IDEMPOTENCY_KEY="s-1")  # fmt: skip
    again = api.post(_url(agent.project), _cron_body(agent), format="json",
                     HTTP_IDEMPOTENCY_KEY="s-1")  # fmt: skip
    assert first.status_code == again.status_code == 201
    assert again.json()["id"] == first.json()["id"]
    assert Schedule.objects.count() == 1 and ChatSession.objects.count() == 1


def _minute_ahead(minutes: int = 2) -> datetime:
    """A minute boundary `minutes` ahead: firings at chosen times after the schedule's
    creation (a cron answers ticks since it was made)."""
    return timezone.now().replace(second=0, microsecond=0) + timedelta(minutes=minutes)


def test_a_tick_fires_once_through_the_chat_path(agent):
    schedule = schedule_create(
        project=agent.project, agent=agent, name="n", content="tick", kind="cron", cron="* * * * *"
    )
    tick = _minute_ahead()
    at = tick + timedelta(seconds=2)
    assert schedule_fire(schedule_id=schedule.id, now=at) == "sent"
    assert schedule_fire(schedule_id=schedule.id, now=at + timedelta(seconds=40)) == "duplicate"
    assert schedule_fire(schedule_id=schedule.id, now=at + timedelta(minutes=1)) == "sent"
    assert Message.objects.filter(session=schedule.session, role="user").count() == 2
    assert Run.objects.filter(session=schedule.session).count() == 2
    fires = list(ScheduleFire.objects.filter(schedule=schedule).order_by("tick"))
    assert [f.tick for f in fires] == [tick, tick + timedelta(minutes=1)]
    assert fires[0].message.run.status == Run.Status.QUEUED  # on the project's bus


def test_a_cron_firing_answers_its_latest_tick(agent):
    """Late, or after missed ticks, a firing claims the cron's latest tick at or before
    it, never the minute it runs in: every firing of one due moment claims the same."""
    schedule = schedule_create(
        project=agent.project, agent=agent, name="n", content="tick", kind="cron",
        cron="0 * * * *", timezone_name="Asia/Kolkata",  # whole hours there: :30 in UTC
    )  # fmt: skip
    hour = timezone.now().astimezone(UTC).replace(minute=30, second=0, microsecond=0)
    if hour <= timezone.now():
        hour += timedelta(hours=1)
    # No tick has come since the schedule was made.
    assert schedule_fire(schedule_id=schedule.id, now=hour - timedelta(minutes=5)) == "early"
    assert schedule_fire(schedule_id=schedule.id, now=hour + timedelta(minutes=42)) == "sent"
    assert schedule_fire(schedule_id=schedule.id, now=hour + timedelta(minutes=59)) == "duplicate"
    # Three ticks missed: one firing, for the latest.
    assert (
        schedule_fire(schedule_id=schedule.id, now=hour + timedelta(hours=3, seconds=9)) == "sent"
    )
    ticks = list(ScheduleFire.objects.filter(schedule=schedule).values_list("tick", flat=True))
    assert hour + timedelta(hours=3) in ticks and hour in ticks
    assert hour + timedelta(hours=1) not in ticks and hour + timedelta(hours=2) not in ticks


def test_a_refused_firing_is_recorded(agent):
    Agent.objects.filter(id=agent.id).update(busy_policy=Agent.BusyPolicy.REJECT)
    schedule = schedule_create(
        project=agent.project, agent=agent, name="n", content="tick", kind="cron", cron="* * * * *"
    )
    at = _minute_ahead()
    assert schedule_fire(schedule_id=schedule.id, now=at) == "sent"  # its run is in flight
    assert schedule_fire(schedule_id=schedule.id, now=at + timedelta(minutes=1)) == "refused"
    fire = ScheduleFire.objects.get(schedule=schedule, outcome="refused")
    assert "in flight" in fire.detail
    assert Message.objects.filter(session=schedule.session, role="user").count() == 1


@pytest.mark.skipif("connection.vendor != 'postgresql'", reason="concurrency needs PostgreSQL")
def test_concurrent_firings_of_one_tick_send_one_message(agent):
    schedule = schedule_create(
        project=agent.project, agent=agent, name="n", content="tick", kind="cron", cron="* * * * *"
    )
    at = _minute_ahead()
    results: list[str] = []
    barrier = threading.Barrier(8)

    def fire() -> None:
        barrier.wait()
        try:
            results.append(schedule_fire(schedule_id=schedule.id, now=at))
        finally:
            connection.close()

    threads = [threading.Thread(target=fire) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(results) == ["duplicate"] * 7 + ["sent"]
    assert Message.objects.filter(session=schedule.session, role="user").count() == 1


def test_beats_scheduler_fires_a_missed_cron_once(agent):
    """django-celery-beat's own entry, with the last run 4 ticks ago (beat was down):
    due now, once; after it runs, not due again until the next tick."""
    schedule = schedule_create(
        project=agent.project, agent=agent, name="n", content="tick", kind="cron", cron="* * * * *"
    )
    task = PeriodicTask.objects.get(id=schedule.periodic_task_id)
    task.last_run_at = timezone.now() - timedelta(minutes=4, seconds=10)
    task.save()
    entry = ModelEntry(task, app=app)
    due, _next = entry.is_due()
    assert due
    entry = next(entry)  # what beat does when it sends the task: last_run_at = now
    due_again, wait = entry.is_due()
    assert not due_again and 0 < wait <= 60


def test_a_real_beat_fires_a_one_off_into_a_worker(agent, live_worker):
    schedule = schedule_create(
        project=agent.project, agent=agent, name="soon", content="wake up", kind="once",
        run_at=timezone.now() + timedelta(seconds=2),
    )  # fmt: skip
    beat = Service(app, max_interval=0.5, scheduler_cls=DatabaseScheduler)

    def run_beat() -> None:
        try:
            beat.start(embedded_process=True)
        finally:
            connections.close_all()  # this thread's

    thread = threading.Thread(target=run_beat, daemon=True)
    thread.start()
    try:
        wait_until(
            lambda: Run.objects.filter(session=schedule.session, status="done").exists(),
            timeout=60,
            what="the scheduled message answered",
        )
    finally:
        beat.stop()
        thread.join(10)
        connection.close()
    fire = ScheduleFire.objects.get(schedule=schedule)
    assert fire.tick == schedule.run_at and fire.outcome == "sent"
    assert Message.objects.get(session=schedule.session, role="user").content == "wake up"
    # A one-off's tick is its run_at: sent again by mistake, it does nothing.
    assert schedule_fire(schedule_id=schedule.id) == "duplicate"


def test_a_scheduled_run_goes_on_the_bulk_lane_and_a_users_on_the_interactive(agent, redis_client):
    mark = project_queue(agent.project_id) + BULK_SUFFIX
    session = ChatSession.objects.create(project=agent.project, agent=agent)
    message_send(session=session, content="a person asks")
    assert Run.objects.get(session=session).lane == "interactive"
    assert redis_client.hget(FLOW_RULES_KEY, mark) is None  # no bulk work queued
    schedule = schedule_create(
        project=agent.project, agent=agent, name="n", content="tick", kind="cron", cron="* * * * *"
    )
    assert schedule_fire(schedule_id=schedule.id, now=_minute_ahead()) == "sent"
    assert Run.objects.get(session=schedule.session).lane == "bulk"
    assert redis_client.hget(FLOW_RULES_KEY, mark) == "1"  # the bulk lane holds its task
