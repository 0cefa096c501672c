"""Schedules: a message an agent is sent once at a time or on every tick of a cron
expression in a time zone, stored as a row of ours plus the django-celery-beat
PeriodicTask that beat's DatabaseScheduler reads, and fired through the chat services
(the same path as a person's message: quotas, the session's busy policy, the bus).

Missed ticks: beat's crontab schedule is due once when its last run is older than the
last tick, however many ticks it missed (celery.schedules.crontab.is_due), so a beat
that was down fires a missed schedule once when it is back, not once per missed tick.
A tick sent twice (two beats by mistake, a task redelivered) runs once: the firing
claims (schedule, tick) under a unique constraint in the transaction that sends the
message. A cron's firing answers the latest tick of its cron at or before the moment it
runs (`automation.cron`), so every firing that answers one due moment (beat's, a late
one, the recovery pass's) claims the same tick. Those ticks are instants: where the
clocks go back, beat's crontab skips the repeated hour, and the pass fires its ticks.

A firing lost with its worker (the broker gives its message back after an hour, and a
cron's message has expired by then), or one that failed (the database was away), is
sent again by the recovery pass (`schedules_missed_fire`, beat every
SCHEDULE_RECOVERY_SECONDS): a tick due SCHEDULE_MISSED_AFTER_SECONDS ago with no firing
since fires then, once, unless a later tick of the cron answered it first.
"""

from __future__ import annotations

import json
import logging
import uuid
import zoneinfo
from datetime import datetime, timedelta

from celery import current_app
from celery.schedules import crontab
from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Exists, OuterRef, Subquery
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

from .cron import CRONTAB_FIELDS, Cron
from .models import Schedule, ScheduleFire

logger = logging.getLogger(__name__)

FIRE_TASK = "automation.fire_schedule"


class ScheduleInvalid(ValueError):
    """A schedule's timing that cannot be used; str() says why (a 400 on `field`)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def cron_fields(expression: str) -> dict[str, str]:
    """A 5-field cron expression as celery's crontab fields (minute, hour, day_of_month,
    month_of_year, day_of_week); raises ScheduleInvalid."""
    parts = expression.split()
    if len(parts) != 5:
        raise ScheduleInvalid(
            "cron", "Five fields: minute hour day-of-month month day-of-week (e.g. `0 9 * * 1`)."
        )
    fields = dict(zip(CRONTAB_FIELDS, parts, strict=True))
    try:
        crontab(**fields)
    except Exception as exc:  # celery's parser raises ValueError or its ParseException
        raise ScheduleInvalid("cron", f"Not a valid cron expression: {exc}") from None
    return fields


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
        task.crontab, _ = CrontabSchedule.objects.get_or_create(
            **cron_fields(schedule.cron), timezone=zoneinfo.ZoneInfo(schedule.timezone)
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


# A firing that beat sent on a clock a little ahead of this host's still answers its tick.
_CLOCK_SKEW = timedelta(seconds=5)


def schedule_tick(schedule: Schedule, now: datetime) -> datetime | None:
    """The tick a firing at `now` answers: `run_at` for a one-off; for a cron, its latest
    tick at or before `now` since the schedule was made (None before its first)."""
    if schedule.kind == Schedule.Kind.ONCE and schedule.run_at is not None:
        return schedule.run_at
    answered = schedule.fires.order_by("-tick").values_list("tick", flat=True).first()
    cron = Cron.parse(cron_fields(schedule.cron), schedule.timezone)
    tick = cron.latest(since=answered or schedule.created_at, until=now + _CLOCK_SKEW)
    return tick or answered  # none since the last answered: that one is the latest


def schedule_fire(*, schedule_id: uuid.UUID | str, now: datetime | None = None) -> str:
    """Send a schedule's message into its session, once per tick. Returns what happened:
    `sent`, `refused` (a quota or a busy session: recorded on the firing), `duplicate`
    (this tick fired already), `early` (no tick yet), `disabled` or `gone`."""
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
    if tick is None:
        logger.warning("schedule %s: fired before its first tick", schedule.id)
        return "early"
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


def schedules_missed_fire(*, now: datetime | None = None) -> int:
    """Fire again the schedules whose due tick has had no firing for
    SCHEDULE_MISSED_AFTER_SECONDS (its task lost with its worker, or failed): a one-off
    past its `run_at`, a cron with a tick since its last firing (or since it was made or
    last changed, when beat started counting). Returns how many were sent; each firing
    still claims its tick, so one that beat's own task answered meanwhile does nothing."""
    now = now or timezone.now()
    due = now - timedelta(seconds=settings.SCHEDULE_MISSED_AFTER_SECONDS)
    fires = ScheduleFire.objects.filter(schedule=OuterRef("pk"))
    missed = list(
        Schedule.objects.filter(enabled=True, kind=Schedule.Kind.ONCE, run_at__lte=due)
        .filter(~Exists(fires))
        .values_list("id", flat=True)
    )
    crons = (
        Schedule.objects.filter(enabled=True, kind=Schedule.Kind.CRON, updated_at__lte=due)
        # Its latest firing: one step down the (schedule, tick) index, however many it has.
        .annotate(answered=Subquery(fires.order_by("-tick").values("tick")[:1]))
        .only("id", "cron", "timezone", "updated_at")
    )
    parsed: dict[tuple[str, str], Cron] = {}  # most schedules share a few crons
    for schedule in crons.iterator(chunk_size=500):
        key = (schedule.cron, schedule.timezone)
        if (cron := parsed.get(key)) is None:
            cron = parsed[key] = Cron.parse(cron_fields(schedule.cron), schedule.timezone)
        since = max(schedule.answered or schedule.updated_at, schedule.updated_at)
        if cron.latest(since=since, until=due) is not None:
            missed.append(schedule.id)
    for schedule_id in missed:
        logger.warning("schedule %s: a due tick had no firing; firing it", schedule_id)
        # By name: the task module (automation.tasks) imports this one.
        current_app.send_task(
            FIRE_TASK,
            kwargs={"schedule_id": str(schedule_id)},
            queue=MAINTENANCE_QUEUE,
            expires=settings.SCHEDULE_RECOVERY_SECONDS,
        )
    return len(missed)
