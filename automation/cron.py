"""A cron expression's ticks in a time zone, as instants.

Fields are parsed by celery's crontab and matched as beat matches them (month, day of
month and day of week must all match). Where beat computes the next run in local wall
time, this works on instants, so the hours in which clocks change are answered as a
person reading the cron would expect (celery/celery#10107: beat skips the repeated
hour):

- A wall time that occurs twice (the hour clocks go back) is a tick twice when the
  cron's minute or hour field has a `*` (`*/5 * * * *`, `0 * * * *`: it runs through
  that hour as through any other), once otherwise (`30 2 * * *` runs once that night).
  Beat fires only the first; the schedules' recovery pass fires the second.
- A wall time that does not occur (the hour clocks skip) is the instant an hour later on
  the wall, as beat fires it (`30 2 * * *` runs at 03:30 that day).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from celery.schedules import crontab

# celery's names of a cron expression's five fields, in their order.
CRONTAB_FIELDS = ("minute", "hour", "day_of_month", "month_of_year", "day_of_week")


@dataclass(frozen=True)
class Cron:
    minutes: tuple[int, ...]  # descending, as the ticks are searched from the latest
    hours: tuple[int, ...]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 is Sunday, as in cron
    repeats: bool  # a wall time that occurs twice is a tick twice
    zone: ZoneInfo

    @classmethod
    def parse(cls, fields: dict[str, str], timezone_name: str) -> Cron:
        """From celery's crontab fields (CRONTAB_FIELDS), checked already."""
        parsed = crontab(**fields)
        return cls(
            minutes=tuple(sorted(parsed.minute, reverse=True)),
            hours=tuple(sorted(parsed.hour, reverse=True)),
            days=frozenset(parsed.day_of_month),
            months=frozenset(parsed.month_of_year),
            weekdays=frozenset(parsed.day_of_week),
            repeats="*" in fields["minute"] or "*" in fields["hour"],
            zone=ZoneInfo(timezone_name),
        )

    def latest(self, *, since: datetime, until: datetime) -> datetime | None:
        """The latest tick in (since, until], in UTC, or None."""
        day, first = until.astimezone(self.zone).date(), since.astimezone(self.zone).date()
        while day >= first - timedelta(days=1):  # a clock change can move a tick a day on
            if self._runs_on(day) and (tick := self._latest_on(day, until)) is not None:
                return tick if tick > since else None
            day -= timedelta(days=1)
        return None

    def _runs_on(self, day: date) -> bool:
        return (
            day.month in self.months
            and day.day in self.days
            and day.isoweekday() % 7 in self.weekdays
        )

    def _latest_on(self, day: date, until: datetime) -> datetime | None:
        """The day's latest tick at or before `until`."""
        start = datetime.combine(day, time(), self.zone)
        offset = start.utcoffset()
        end = datetime.combine(day + timedelta(days=1), time(), self.zone)
        if {
            start.replace(fold=1).utcoffset(),
            end.utcoffset(),
            end.replace(fold=1).utcoffset(),
        } != {offset}:
            # The clocks change that day: every wall time, as the instants it stands for.
            ticks = [
                tick
                for hour in self.hours
                for minute in self.minutes
                for tick in self._instants(datetime.combine(day, time(hour, minute)))
                if tick <= until
            ]
            return max(ticks, default=None)
        # One offset all day: wall times and instants keep one order, the latest first.
        wall_until = (until + offset).replace(tzinfo=None)
        bound = (wall_until.hour, wall_until.minute) if wall_until.date() == day else (23, 59)
        for hour in self.hours:
            if hour <= bound[0]:
                for minute in self.minutes:
                    if (hour, minute) <= bound:
                        wall = datetime.combine(day, time(hour, minute))
                        return (wall - offset).replace(tzinfo=UTC)
        return None

    def _instants(self, wall: datetime) -> tuple[datetime, ...]:
        earlier = wall.replace(tzinfo=self.zone).astimezone(UTC)
        later = wall.replace(tzinfo=self.zone, fold=1).astimezone(UTC)
        if later > earlier:  # the wall time occurs twice
            return (earlier, later) if self.repeats else (earlier,)
        return (earlier,)  # once, or never: then `earlier` is an hour on
