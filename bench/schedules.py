"""A recurring schedule with beat stopped for part of the time: how many runs, per tick.

    createdb -h 127.0.0.1 -U postgres uws_sched_bench   # any PostgreSQL database
    DATABASE_URL=postgres://postgres@127.0.0.1:5432/uws_sched_bench \\
      bin/with-redis --ephemeral -- .venv/bin/python bench/schedules.py [--minutes 10 --down 3,6]

In real time, with the Procfile's own `beat`, `worker` and `maintenance` lines (beat on
django-celery-beat's DatabaseScheduler, the shared worker following uws.maintenance and
the active project queues, the maintenance worker running the recovery pass of lost
firings): a `* * * * *` schedule (UTC) of an agent on the offline provider is created at
T = a minute boundary + 30 s; beat runs from T, is stopped (SIGTERM) at T+down[0]
minutes and started again at T+down[1]; at T+minutes everything stops and the script
counts, per tick minute, the firings (automation.ScheduleFire), the user messages and the
runs of the schedule's session. Goal (issue 26): minutes=10, beat down 3 of them -> 8
runs (7 ticks while beat ran + 1 for the missed ones), never two for one tick.

Nothing is faked: no clock is moved, beat's real scheduler decides what is due. Left
out: several beats at once (the unique (schedule, tick) constraint is tested in
tests/automation/test_schedules.py), a beat killed with SIGKILL (its last-run times are
then up to its sync interval old; the catch-up is still one firing, by the same rule).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if __name__ == "__main__":
    sys.path[:0] = [str(ROOT)]
    from bench.harness import bootstrap

    bootstrap("schedules")

from django.contrib.auth import get_user_model  # noqa: E402
from django.core.management import call_command  # noqa: E402

from agents.models import Agent  # noqa: E402
from automation.models import ScheduleFire  # noqa: E402
from automation.schedules import schedule_create  # noqa: E402
from bench.harness import procfile  # noqa: E402
from chat.models import Message, Run  # noqa: E402
from projects.models import Project  # noqa: E402


def start(name: str, log_dir: Path) -> subprocess.Popen:
    log = open(log_dir / f"{name}.log", "ab")  # noqa: SIM115 (the process keeps it)
    env = dict(os.environ, REMAP_SIGTERM="SIGQUIT", PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        procfile(name), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def sleep_until(moment: datetime) -> None:
    while (left := (moment - datetime.now(UTC)).total_seconds()) > 0:
        time.sleep(min(left, 1.0))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=int, default=10)
    parser.add_argument("--down", default="3,6", help="beat stopped from,to (minutes after T)")
    args = parser.parse_args()
    down_from, down_to = (int(x) for x in args.down.split(","))

    call_command("migrate", verbosity=0)
    user, _ = get_user_model().objects.get_or_create(username="sched-bench")
    project = Project.objects.create(owner=user, name=f"sched {time.time():.0f}")
    agent = Agent.objects.create(
        project=project, name="ticker", system_prompt="Say hi.", model="offline"
    )
    log_dir = Path(os.environ["VAR_DIR"]) / f"logs-{int(time.time())}"
    log_dir.mkdir(parents=True)
    worker = start("worker", log_dir)
    maintenance = start("maintenance", log_dir)  # the recovery pass of lost firings

    now = datetime.now(UTC)
    t0 = now.replace(second=30, microsecond=0)
    if t0 <= now + timedelta(seconds=15):
        t0 += timedelta(minutes=1)
    print(f"load: {os.getloadavg()}  T = {t0:%H:%M:%S} UTC; logs in {log_dir}", flush=True)
    sleep_until(t0 - timedelta(seconds=10))
    schedule = schedule_create(
        project=project, agent=agent, name="every minute", content="tick", kind="cron",
        cron="* * * * *",
    )  # fmt: skip
    sleep_until(t0)
    beat = start("beat", log_dir)
    print(f"{datetime.now(UTC):%H:%M:%S} beat started", flush=True)
    sleep_until(t0 + timedelta(minutes=down_from))
    stop(beat)
    print(f"{datetime.now(UTC):%H:%M:%S} beat stopped", flush=True)
    sleep_until(t0 + timedelta(minutes=down_to))
    beat = start("beat", log_dir)
    print(f"{datetime.now(UTC):%H:%M:%S} beat started again", flush=True)
    end = t0 + timedelta(minutes=args.minutes)
    sleep_until(end)
    stop(beat)
    time.sleep(0)  # the last firing's run may still be answering: count what was sent
    deadline = time.monotonic() + 60
    while (
        Run.objects.filter(session=schedule.session, status__in=("queued", "running")).exists()
        and time.monotonic() < deadline
    ):
        time.sleep(0.5)
    stop(worker)
    stop(maintenance)

    fires = list(ScheduleFire.objects.filter(schedule=schedule).order_by("tick"))
    messages = Message.objects.filter(session=schedule.session, role="user")
    runs = Run.objects.filter(session=schedule.session)
    print()
    print(f"window {t0:%H:%M:%S}-{end:%H:%M:%S} UTC; beat down "
          f"{t0 + timedelta(minutes=down_from):%H:%M:%S}-"
          f"{t0 + timedelta(minutes=down_to):%H:%M:%S}")  # fmt: skip
    print(f"{'tick (minute)':<22}{'fired at':<12}{'outcome':<10}")
    for fire in fires:
        print(f"{fire.tick:%Y-%m-%d %H:%M}{'':<6}{fire.fired_at:%H:%M:%S}{'':<4}{fire.outcome}")
    per_minute: dict[str, int] = {}
    for m in messages:
        key = f"{m.created_at:%H:%M}"
        per_minute[key] = per_minute.get(key, 0) + 1
    print()
    print(f"firings: {len(fires)}   user messages: {messages.count()}   runs: {runs.count()} "
          f"(done: {runs.filter(status='done').count()})   "
          f"most messages in one minute: {max(per_minute.values(), default=0)}")  # fmt: skip
    print(f"load after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
