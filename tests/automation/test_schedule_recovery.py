"""A schedule's firing lost with its worker, or failed, is fired again by the recovery
pass: which schedules it picks, and a real worker SIGKILLed while it fires."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from django.db import connection, transaction
from django.utils import timezone

from agentbus.queues import MAINTENANCE_QUEUE
from automation.models import Schedule, ScheduleFire
from automation.schedules import FIRE_TASK, schedule_create, schedule_fire, schedules_missed_fire
from chat.models import Message
from config.celery_app import app
from projects.models import Project
from tests.workers import SESSIONS_NAME, wait_for, wait_until

pytestmark = pytest.mark.django_db(transaction=True)


def _create(agent, **timing) -> Schedule:
    return schedule_create(project=agent.project, agent=agent, name="n", content="tick", **timing)


def test_the_pass_fires_a_due_tick_that_had_no_firing(agent, settings):
    """A tick is missed once SCHEDULE_MISSED_AFTER_SECONDS passed with no firing since
    the last one, or since the schedule was made; a disabled schedule is never fired."""
    settings.SCHEDULE_MISSED_AFTER_SECONDS = 60
    cron = _create(agent, kind="cron", cron="* * * * *")
    _create(agent, kind="cron", cron="* * * * *", enabled=False)
    made = cron.updated_at
    first = made.replace(second=0, microsecond=0) + timedelta(minutes=1)  # its first tick
    assert schedules_missed_fire(now=made + timedelta(seconds=59)) == 0  # just made
    assert schedules_missed_fire(now=first + timedelta(seconds=59)) == 0  # not due long enough
    assert schedules_missed_fire(now=first + timedelta(seconds=61)) == 1

    # Fired then, it answers the latest tick: the first was missed, and the second came.
    assert schedule_fire(schedule_id=cron.id, now=first + timedelta(seconds=61)) == "sent"
    assert ScheduleFire.objects.get(schedule=cron).tick == first + timedelta(minutes=1)
    # The next tick, first + 2 min, is missed a minute later.
    assert schedules_missed_fire(now=first + timedelta(minutes=2, seconds=59)) == 0
    assert schedules_missed_fire(now=first + timedelta(minutes=3, seconds=1)) == 1

    once = _create(agent, kind="once", run_at=made + timedelta(hours=1))
    at = once.run_at + timedelta(seconds=61)
    assert schedules_missed_fire(now=once.run_at) == 1  # the cron only
    assert schedules_missed_fire(now=at) == 2  # and the one-off
    assert schedule_fire(schedule_id=once.id) == "sent"  # a one-off's tick is its run_at
    assert schedule_fire(schedule_id=cron.id, now=at) == "sent"
    assert schedules_missed_fire(now=at) == 0


@pytest.mark.skipif(
    "connection.vendor != 'postgresql'", reason="a worker process shares the database"
)
def test_a_firing_lost_with_its_worker_is_fired_again(agent, worker_process, settings):
    """Beat's task for a one-off is taken by a worker that is SIGKILLed while it fires:
    the broker would give the message back an hour later. The pass fires it again, and
    a new worker sends the message, once."""
    settings.SCHEDULE_MISSED_AFTER_SECONDS = 0
    schedule = _create(agent, kind="once", run_at=timezone.now() + timedelta(seconds=2))
    wait_until(lambda: timezone.now() > schedule.run_at, what="the run_at passed")
    args = ("-Q", MAINTENANCE_QUEUE, "--agentbus-mode", "dedicated", "-P", "threads", "-c", "2")
    env = {"PGAPPNAME": SESSIONS_NAME}
    first = worker_process(*args, env=env)
    first.wait_started()
    with transaction.atomic():
        # The firing waits on the project (a message is being added to it) while held here.
        Project.objects.select_for_update().get(id=agent.project_id)
        app.send_task(FIRE_TASK, kwargs={"schedule_id": str(schedule.id)}, queue=MAINTENANCE_QUEUE)
        waiting = wait_for(lambda: _sessions_waiting_on_a_lock() > 0, timeout=30)
        assert waiting, first.log()
        first.kill_group()
    killed = time.monotonic()
    assert not ScheduleFire.objects.filter(schedule=schedule).exists()

    assert schedules_missed_fire() == 1
    second = worker_process(*args)
    second.wait_started()
    fired = wait_for(lambda: ScheduleFire.objects.filter(schedule=schedule).first(), timeout=30)
    print(f"schedule: worker killed to its message sent: {time.monotonic() - killed:.2f}s")
    assert fired and fired.outcome == "sent", second.log()
    assert fired.tick == schedule.run_at
    assert Message.objects.filter(session=schedule.session, role="user").count() == 1
    assert schedules_missed_fire() == 0


def _sessions_waiting_on_a_lock() -> int:
    with connection.cursor() as cursor:
        # Read in a transaction, the activity view is the snapshot its first read took.
        cursor.execute("SELECT pg_stat_clear_snapshot()")
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
            " AND datname = current_database() AND wait_event_type = 'Lock'",
            [SESSIONS_NAME],
        )
        return cursor.fetchone()[0]
