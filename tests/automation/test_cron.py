"""A cron's ticks as instants (automation.cron): the same as beat's crontab on days of
one offset, and every tick of the hours in which clocks change, through the schedules'
firing and recovery pass."""

from __future__ import annotations

import random
import zoneinfo
from datetime import UTC, datetime, timedelta

import pytest
from django_celery_beat.models import CrontabSchedule

from automation.cron import Cron
from automation.models import Schedule, ScheduleFire
from automation.schedules import cron_fields, schedule_create, schedule_fire, schedules_missed_fire

EXPRESSIONS = (
    "* * * * *",
    "*/7 * * * *",
    "0 * * * *",
    "15,45 9-17 * * 1-5",
    "30 2 * * *",
    "0 0 1 * *",
    "5 4 * * 0",
    "0 12 13 * 5",  # a Friday the 13th: beat wants every field to match
    "59 23 31 12 *",
)


def _beats_latest(expression: str, zone: str, since: datetime, until: datetime):
    """The latest tick in (since, until] by beat's own crontab, one tick after another."""
    cron = CrontabSchedule(**cron_fields(expression), timezone=zoneinfo.ZoneInfo(zone)).schedule
    cron.nowfun = lambda: until.astimezone(cron.tz)
    latest, at = None, since
    while (tick := until + cron.remaining_estimate(at.astimezone(cron.tz))) <= until and tick > at:
        latest = at = tick
    return latest


def test_on_days_of_one_offset_the_ticks_are_beats():
    """Windows of up to two days in zones and months where no clock changes: the latest
    tick is the one beat's crontab reaches, or none for both."""
    rng = random.Random(20261206)
    months = {"UTC": range(1, 13), "Asia/Kolkata": range(1, 13), "Europe/Berlin": (1, 6, 7, 12)}
    answered = 0
    for _ in range(120):
        zone = rng.choice(sorted(months))
        expression = rng.choice(EXPRESSIONS)
        until = datetime(
            2027, rng.choice(months[zone]), rng.randint(3, 26), rng.randint(0, 23),
            rng.randint(0, 59), rng.randint(0, 59), tzinfo=UTC,
        )  # fmt: skip
        since = until - timedelta(minutes=rng.randint(0, 2 * 24 * 60))
        ours = Cron.parse(cron_fields(expression), zone).latest(since=since, until=until)
        assert ours == _beats_latest(expression, zone, since, until), (expression, zone, until)
        answered += ours is not None
    assert answered > 60  # most windows hold a tick: the comparison is not of Nones


def _ticks(expression: str, zone: str, since: datetime, until: datetime) -> list[str]:
    cron, ticks = Cron.parse(cron_fields(expression), zone), []
    while (tick := cron.latest(since=since, until=until)) is not None:
        ticks.append(tick.astimezone(cron.zone).strftime("%H:%M%z"))
        until = tick - timedelta(seconds=1)
    return ticks[::-1]


# Berlin's clocks go back at 01:00 UTC on 2027-10-31 (03:00 CEST -> 02:00 CET) and
# forward at 01:00 UTC on 2027-03-28 (02:00 CET -> 03:00 CEST).
BACK = datetime(2027, 10, 30, 23, 30, tzinfo=UTC), datetime(2027, 10, 31, 2, 30, tzinfo=UTC)
FORWARD = datetime(2027, 3, 28, 0, 30, tzinfo=UTC), datetime(2027, 3, 28, 2, 30, tzinfo=UTC)


@pytest.mark.parametrize(
    "expression, window, expected",
    [
        # The repeated hour is run through by a cron with a `*` in its minute or hour...
        ("0 * * * *", BACK, ["02:00+0200", "02:00+0100", "03:00+0100"]),
        (
            "*/30 2 * * *",
            BACK,
            ["02:00+0200", "02:30+0200", "02:00+0100", "02:30+0100"],
        ),
        # ...and run once by one set for a time of day.
        ("30 2 * * *", BACK, ["02:30+0200"]),
        # A wall time that does not occur is the instant an hour on, as beat has it.
        ("0 * * * *", FORWARD, ["03:00+0200", "04:00+0200"]),
        ("30 2 * * *", FORWARD, ["03:30+0200"]),
    ],
)
def test_the_hours_in_which_clocks_change(expression, window, expected):
    assert _ticks(expression, "Europe/Berlin", *window) == expected


@pytest.mark.django_db(transaction=True)
def test_the_repeated_hours_tick_is_fired_by_the_pass(agent, settings):
    """Beat's crontab skips the hour Berlin's clocks go back (celery/celery#10107). The
    recovery pass finds its tick missed, and the firing claims it; a daily cron's wall
    time that comes again that night is no second tick."""
    settings.SCHEDULE_MISSED_AFTER_SECONDS = 60
    hourly, daily = (
        schedule_create(
            project=agent.project,
            agent=agent,
            name=cron,
            content="tick",
            kind="cron",
            cron=cron,
            timezone_name="Europe/Berlin",
        )  # fmt: skip
        for cron in ("0 * * * *", "30 2 * * *")
    )
    made = datetime(2027, 10, 30, 12, tzinfo=UTC)
    Schedule.objects.update(created_at=made, updated_at=made)
    at = datetime(2027, 10, 31, 0, 0, 5, tzinfo=UTC)  # beat: 02:00 CEST
    assert schedule_fire(schedule_id=hourly.id, now=at) == "sent"
    at = datetime(2027, 10, 31, 0, 30, 5, tzinfo=UTC)  # beat: 02:30 CEST
    assert schedule_fire(schedule_id=daily.id, now=at) == "sent"
    # 02:00 CET: beat sends nothing; a minute on, the pass sees the hourly tick missed.
    at = datetime(2027, 10, 31, 1, 1, 5, tzinfo=UTC)
    assert schedules_missed_fire(now=at) == 1
    assert schedule_fire(schedule_id=hourly.id, now=at) == "sent"
    assert schedule_fire(schedule_id=daily.id, now=at) == "duplicate"
    at = datetime(2027, 10, 31, 1, 31, 5, tzinfo=UTC)  # 02:30 CET: the daily's done
    assert schedules_missed_fire(now=at) == 0
    at = datetime(2027, 10, 31, 2, 0, 5, tzinfo=UTC)  # beat: 03:00 CET
    assert schedule_fire(schedule_id=hourly.id, now=at) == "sent"

    ticks = ScheduleFire.objects.filter(schedule=hourly).order_by("tick")
    assert [f.tick.strftime("%H:%M") for f in ticks] == ["00:00", "01:00", "02:00"]
    assert [f.outcome for f in ticks] == ["sent"] * 3
    assert ScheduleFire.objects.filter(schedule=daily).count() == 1
