"""Schedules: a message an agent is sent once at a time or on every tick of a cron
expression in a time zone, stored as a row of ours plus the django-celery-beat
PeriodicTask that beat's DatabaseScheduler reads, and fired through the chat services
(the same path as a person's message: quotas, the session's busy policy, the bus).

Missed ticks: beat's crontab schedule is due once when its last run is older than the
last tick, however many ticks it missed (celery.schedules.crontab.is_due), so a beat
that was down fires a missed schedule once when it is back, not once per missed tick.
A tick sent twice (two beats by mistake, a task redelivered) runs once: the firing
claims (schedule, tick) under a unique constraint in the transaction that sends the
message.
"""

from __future__ import annotations

import json
import logging
import uuid
import zoneinfo
from datetime import UTC, datetime

from celery.schedules import crontab
from django.conf import settings
from django.db import IntegrityError, transaction
from django.http import Http404
from django.utils import timezone
from django_celery_beat.models import ClockedSchedule, CrontabSchedule, PeriodicTask

from agentbus import MAINTENANCE_QUEUE
from agents.models import Agent
from chat.models import ChatSession
from chat.services import SessionBusy, message_send, session_create
from governance.quotas import QuotaUnavailable
from governance.usage import QuotaExceeded
from projects.models import Project
from projects.services import project_lock_for_write

from .models import Schedule, ScheduleFire

logger = logging.getLogger(__name__)

FIRE_TASK = "automation.fire_schedule"


class ScheduleInvalid(ValueError):
    """A schedule's timing that cannot be used; str() says why (a 400 on `field`)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def cron_fields(expression: str) -> tuple[str, str, str, str, str]:
    """(minute, hour, day of month, month, day of week) of a 5-field cron expression;
    raises ScheduleInvalid."""
    parts = expression.split()
    if len(parts) != 5:
        raise ScheduleInvalid(
            "cron", "Five fields: minute hour day-of-month month day-of-week (e.g. `0 9 * * 1`)."
        )
    minute, hour, day_of_month, month, day_of_week = parts
    try:
        crontab(
            minute=minute,
            hour=hour,
            day_of_month=day_of_month,
            month_of_year=month,
            day_of_week=day_of_week,
        )
    except Exception as exc:  # celery's parser raises ValueError or its ParseException
        raise ScheduleInvalid("cron", f"Not a valid cron expression: {exc}") from None
    return minute, hour, day_of_month, month, day_of_week


def timezone_valid(name: str) -> str:
    if name not in zoneinfo.available_timezones():
        raise ScheduleInvalid("timezone", "Not an IANA time zone (e.g. `Europe/Berlin`, `UTC`).")
    return name


def _periodic_task_sync(schedule: Schedule) -> None:
    """Make beat's row say what the schedule says (inside the caller's transaction)."""
    task = schedule.periodic_task or PeriodicTask(name=f"schedule:{schedule.id}", task=FIRE_TASK)
    task.kwargs = json.dumps({"schedule_id": str(schedule.id)})
    task.queue = MAINTENANCE_QUEUE
    task.enabled = schedule.enabled
    old_clocked = task.clocked if task.clocked_id else None
    if schedule.kind == Schedule.Kind.CRON:
        minute, hour, day_of_month, month, day_of_week = cron_fields(schedule.cron)
        task.crontab, _ = CrontabSchedule.objects.get_or_create(
            minute=minute,
            hour=hour,
            day_of_month=day_of_month,
            month_of_year=month,
            day_of_week=day_of_week,
            timezone=zoneinfo.ZoneInfo(schedule.timezone),
        )
        task.clocked = None
        task.one_off = False
        task.expire_seconds = settings.SCHEDULE_TASK_EXPIRES_SECONDS
    else:
        task.clocked = ClockedSchedule.objects.create(clocked_time=schedule.run_at)
        task.crontab = None
        task.one_off = True
        task.expire_seconds = None
    # A changed schedule starts counting from now (an older last run would fire at once).
    task.last_run_at = None
    task.save()
    if old_clocked is not None and old_clocked.id != task.clocked_id:
        old_clocked.delete()
    if schedule.periodic_task_id != task.id:
        schedule.periodic_task = task
        Schedule.objects.filter(id=schedule.id).update(periodic_task=task)


@transaction.atomic
def schedule_create(
    *,
    project: Project,
    agent: Agent,
    name: str,
    content: str,
    kind: str,
    run_at: datetime | None = None,
    cron: str = "",
    timezone_name: str = "UTC",
    session: ChatSession | None = None,
    enabled: bool = True,
) -> Schedule:
    """A schedule of `agent`'s, into `session` (or a session made for it). Raises
    ScheduleInvalid for timing that cannot be used."""
    if agent.project_id != project.id or (session is not None and session.agent_id != agent.id):
        raise ValueError("the agent or session belongs elsewhere")
    timing_valid(kind=kind, run_at=run_at, cron=cron, timezone_name=timezone_name)
    project_lock_for_write(project_id=project.id)
    if session is None:
        session = session_create(project=project, agent=agent, title=f"Schedule: {name}"[:200])
    schedule = Schedule.objects.create(
        project=project,
        agent=agent,
        session=session,
        name=name,
        content=content,
        kind=kind,
        run_at=run_at if kind == Schedule.Kind.ONCE else None,
        cron=cron if kind == Schedule.Kind.CRON else "",
        timezone=timezone_name,
        enabled=enabled,
    )
    _periodic_task_sync(schedule)
    return schedule


SCHEDULE_UPDATABLE = ("name", "content", "enabled", "run_at", "cron", "timezone")


@transaction.atomic
def schedule_update(*, schedule: Schedule, data: dict) -> Schedule:
    """Change a schedule's name, message, timing or `enabled`; beat sees it within its
    next tick."""
    locked = Schedule.objects.select_for_update().filter(id=schedule.id).first()
    if locked is None:
        raise Http404("No such schedule.")
    for field in SCHEDULE_UPDATABLE:
        if field in data:
            setattr(locked, field, data[field])
    timing_valid(
        kind=locked.kind, run_at=locked.run_at, cron=locked.cron, timezone_name=locked.timezone,
        check_future="run_at" in data,
    )  # fmt: skip
    locked.save()
    _periodic_task_sync(locked)
    return locked


def schedule_delete(*, schedule: Schedule) -> None:
    """Delete a schedule (its beat row goes with it: automation.receivers)."""
    with transaction.atomic():
        if not Schedule.objects.filter(id=schedule.id).delete()[0]:
            raise Http404("No such schedule.")


def timing_valid(
    *, kind: str, run_at, cron: str, timezone_name: str, check_future: bool = True
) -> None:
    timezone_valid(timezone_name)
    if kind == Schedule.Kind.CRON:
        if not cron:
            raise ScheduleInvalid("cron", "A `cron` schedule needs a cron expression.")
        cron_fields(cron)
    elif kind == Schedule.Kind.ONCE:
        if run_at is None:
            raise ScheduleInvalid("run_at", "A `once` schedule needs `run_at`.")
        if check_future and run_at <= timezone.now():
            raise ScheduleInvalid("run_at", "`run_at` must be in the future.")
    else:
        raise ScheduleInvalid("kind", "`once` or `cron`.")


# --- Firing (beat -> automation.fire_schedule) --------------------------------------


def schedule_tick(schedule: Schedule, now: datetime) -> datetime:
    """The tick a firing at `now` answers: `run_at` for a one-off; for a cron, the minute
    (cron's finest step), so two firings within one minute are one tick."""
    if schedule.kind == Schedule.Kind.ONCE and schedule.run_at is not None:
        return schedule.run_at
    return now.astimezone(UTC).replace(second=0, microsecond=0)


def schedule_fire(*, schedule_id: uuid.UUID | str, now: datetime | None = None) -> str:
    """Send a schedule's message into its session, once per tick. Returns what happened:
    `sent`, `refused` (a quota or a busy session: recorded on the firing), `duplicate`
    (this tick fired already), `disabled` or `gone`."""
    schedule = (
        Schedule.objects.select_related("session__agent", "session__project")
        .filter(id=schedule_id)
        .first()
    )
    if schedule is None:
        # Its beat row outlived it (deleted between beat's read and now): drop it quietly.
        PeriodicTask.objects.filter(name=f"schedule:{schedule_id}").delete()
        return "gone"
    if not schedule.enabled:
        return "disabled"
    tick = schedule_tick(schedule, now or timezone.now())
    try:
        with transaction.atomic():
            # Held to commit: a concurrent firing of the same tick waits here, then
            # finds it taken.
            fire = ScheduleFire.objects.create(
                schedule=schedule, tick=tick, outcome=ScheduleFire.Outcome.SENT
            )
            try:
                with transaction.atomic():
                    # Scheduled work is bulk: it never holds up people's chats.
                    _question, answer = message_send(
                        session=schedule.session, content=schedule.content, lane="bulk"
                    )
            except (QuotaExceeded, QuotaUnavailable, SessionBusy) as exc:
                fire.outcome = ScheduleFire.Outcome.REFUSED
                fire.detail = str(getattr(exc, "detail", exc))
                fire.save(update_fields=["outcome", "detail"])
                logger.info("schedule %s: refused: %s", schedule.id, fire.detail)
                return "refused"
            fire.message = answer
            fire.save(update_fields=["message"])
    except IntegrityError:
        return "duplicate"
    except Http404:
        return "gone"  # the session or project went meanwhile
    return "sent"
