"""Webhook deliveries: 1,000 run completions to 10 endpoints of which 3 are down.

    createdb -h 127.0.0.1 -U postgres uws_hooks_bench   # any PostgreSQL database
    DATABASE_URL=postgres://postgres@127.0.0.1:5432/uws_hooks_bench \\
      bin/with-redis --ephemeral -- .venv/bin/python bench/webhooks.py [--runs 1000 --rounds 3]

Started as the Procfile starts them: the `webhooks` worker (its own queue, 50 threads;
it drains each endpoint's due deliveries in batches, automation.delivery), the shared
`worker` (runs the sweep of due deliveries) and `beat`. Endpoints are HTTP servers on
127.0.0.1 in a process of their own per measurement (`--serve`: their threads do not
share the bench's GIL, so arrival times are not stamped late), with
EGRESS_ALLOW_NETWORKS_WEBHOOKS=127.0.0.0/8: 7 live ones answering 204, and 3 down: one
refusing connections (closed port), one answering 500, one accepting and never answering
(each attempt waits out WEBHOOK_TIMEOUT_SECONDS). Every endpoint subscribes to
`run.completed`.

Each round, subject and baseline: the same --runs runs of a project are ended through
chat.state.run_end (the one run-end path, which records the deliveries in its
transaction and queues them after commit), by 8 threads, all at once or --rate per
second; the baseline's
project has the 7 live endpoints only, the subject's all 10, and which of the two goes
first alternates by round (the first was the slower). Latency of a delivery: from
the return of run_end to its arrival at the live endpoint. Also counted: attempts the
dead endpoints got in the window (they are backed off as a whole, so far fewer than the
events), and deliveries still pending for them (retried later, up to a day).

Left out: agents answering (the runs are ended by this process, not by the engine, so
the figure is the webhook path alone); endpoints on other hosts (loopback has no network
latency); several webhooks workers. Settings changed: EGRESS_ALLOW_NETWORKS_WEBHOOKS (above),
DEBUG=false, CELERY_BROKER_URL=REDIS_URL; all WEBHOOK_* settings are the defaults. The
"ending" column is how long the 8 threads took to end the runs: on a loaded machine the
burst is spread over that long. Each measurement's receivers and projects are new (the
workers are not restarted): its first batches open the endpoints' connections.

`--backlog N` first puts N pending, past-due deliveries of 3 dead (backed-off) endpoints
in the table (once per database), what a day of dead receivers leaves; `--claim-plan`
then prints EXPLAIN ANALYZE of a drain's claim of 50 for an endpoint with N delivered
ones beside them, and stops (it does not migrate: run `manage.py migrate automation
0001` first for the plan before the claim's index).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if __name__ == "__main__":
    sys.path[:0] = [str(ROOT)]
    if sys.argv[1:] != ["--serve"]:  # the endpoints' process needs no Django
        from bench.harness import bootstrap

        bootstrap("webhooks", EGRESS_ALLOW_NETWORKS_WEBHOOKS="127.0.0.0/8")


from bench.harness import procfile  # noqa: E402

# The apps' modules (models, services) are imported inside the functions that use them:
# the receivers' process (--serve) runs without Django, and the others set it up above.


def start(name: str, log_dir: Path) -> subprocess.Popen:
    log = open(log_dir / f"{name}.log", "ab")  # noqa: SIM115 (the process keeps it)
    env = dict(os.environ, REMAP_SIGTERM="SIGQUIT", PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        procfile(name), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


class Server(ThreadingHTTPServer):
    daemon_threads = True
    # The listen backlog (set before it listens): at 5, connections opened at once
    # overflow it and wait out a SYN retransmit (1 s).
    request_queue_size = 1024


class Live:
    """An endpoint answering 204, recording (run id, arrival time)."""

    def __init__(self, status: int = 204) -> None:
        self.arrivals: dict[str, float] = {}
        self.hits = 0
        live = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                at = time.time()
                live.hits += 1
                found = re.search(rb'"run_id":"([0-9a-f-]+)"', body)
                if found:
                    live.arrivals.setdefault(found.group(1).decode(), at)
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


class Hanging:
    """Accepts connections and never answers."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4096)
        self.held: list[socket.socket] = []
        self.hits = 0
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/hook"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            conn, _ = self.sock.accept()
            self.hits += 1
            self.held.append(conn)


def serve() -> None:
    """`--serve`: the endpoints in a process of their own (their GIL is not the bench's:
    arrival times are not late because the enders hold it). Prints the URLs as JSON, then
    answers stdin lines: `count` (arrivals per live endpoint), `dump` (the arrivals)."""
    live = [Live() for _ in range(7)]
    dead_500, hanging = Live(status=500), Hanging()
    print(
        json.dumps(
            {
                "live": [e.url for e in live],
                "500": dead_500.url,
                "hang": hanging.url,
                "refused": closed_port_url(),
            }
        ),
        flush=True,
    )
    for line in sys.stdin:
        if line.strip() == "count":
            print(json.dumps([len(e.arrivals) for e in live]), flush=True)
        elif line.strip() == "dump":
            print(json.dumps([e.arrivals for e in live]), flush=True)


class Endpoints:
    """The `--serve` process of one measurement."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--serve"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True, cwd=ROOT,
        )  # fmt: skip
        self.urls = json.loads(self.proc.stdout.readline())

    def ask(self, what: str):
        self.proc.stdin.write(what + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


def closed_port_url() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}/hook"


# Runs are ended by this many threads at once, as a pool of workers ends them.
ENDERS = 8
# How long a measurement waits for its live deliveries.
DRAIN_SECONDS = 300


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its children."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(stat.parent.name) == pid or int(fields[1]) == pid:
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def one(
    label: str, runs: int, with_dead: bool, user, worker_pids: list[int], rate: float,
    dump: Path | None,
) -> dict:  # fmt: skip
    # not at the top: the --serve process runs without Django
    from django.db import connections, transaction

    from agents.models import Agent
    from automation.models import WebhookAttempt, WebhookDelivery
    from automation.webhooks import webhook_create
    from chat import state
    from chat.models import ChatSession, Run
    from projects.models import Project

    project = Project.objects.create(owner=user, name=f"hooks {label} {uuid.uuid4().hex[:6]}")
    agent = Agent.objects.create(project=project, name="a", model="offline")
    sessions = [ChatSession.objects.create(project=project, agent=agent) for _ in range(10)]
    endpoints = Endpoints()
    for url in endpoints.urls["live"]:
        webhook_create(project=project, url=url, events=["run.completed"])
    dead_urls = {}
    if with_dead:
        dead_urls = {k: endpoints.urls[k] for k in ("refused", "500", "hang")}
        for url in dead_urls.values():
            webhook_create(project=project, url=url, events=["run.completed"])
    made = []
    for i in range(runs):
        with transaction.atomic():
            _q, _a, run = state.run_create(
                session=sessions[i % 10], run_id=uuid.uuid4(), question="q"
            )
        made.append(run)
    Run.objects.filter(id__in=[r.id for r in made]).update(status=Run.Status.RUNNING)
    ended: dict[str, float] = {}
    cpu_before = sum(cpu_seconds(pid) for pid in worker_pids)
    started = time.time()

    def end(share: list) -> None:
        try:
            for index, run in share:
                if rate:  # completions spread at `rate` per second
                    time.sleep(max(0.0, started + index / rate - time.time()))
                run.session.project = project
                state.run_end(run=run, status=Run.Status.DONE, content="done")
                ended[str(run.id)] = time.time()
        finally:
            connections.close_all()

    numbered = list(enumerate(made))
    enders = [threading.Thread(target=end, args=(numbered[i::ENDERS],)) for i in range(ENDERS)]
    for thread in enders:
        thread.start()
    for thread in enders:
        thread.join()
    ending_seconds = time.time() - started
    # Drained before the next measurement starts (a leftover backlog would delay it).
    deadline = time.monotonic() + DRAIN_SECONDS
    while time.monotonic() < deadline and any(n < runs for n in endpoints.ask("count")):
        time.sleep(0.2)
    window = time.time() - started
    worker_cpu = sum(cpu_seconds(pid) for pid in worker_pids) - cpu_before
    arrivals = endpoints.ask("dump")
    endpoints.close()
    latencies = sorted(
        got[run_id] - ended[run_id] for got in arrivals for run_id in got if run_id in ended
    )
    if dump:  # for a look at when the late ones ended and arrived
        name = f"{label.split()[-1]}-{int(started)}.json"
        (dump / name).write_text(
            json.dumps({"started": started, "ended": ended, "arrivals": arrivals})
        )
    delivered = sum(len(got) for got in arrivals)
    dead_attempts = WebhookAttempt.objects.filter(
        delivery__endpoint__project=project, delivery__endpoint__url__in=dead_urls.values()
    ).count()
    dead_pending = WebhookDelivery.objects.filter(
        endpoint__project=project, endpoint__url__in=dead_urls.values(), status="pending"
    ).count()

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] if latencies else 0

    return {
        "label": label,
        "delivered": f"{delivered}/{runs * 7}",
        "p50": pct(0.50),
        "p99": pct(0.99),
        "max": latencies[-1] if latencies else 0,
        "ending_s": ending_seconds,
        "window_s": window,
        "dead_attempts": dead_attempts,
        "dead_pending": dead_pending,
        "dead_events": runs * 3 if with_dead else 0,
        "cpu_ms_per_delivery": 1000 * worker_cpu / max(delivered, 1),
    }


def deliveries_add(endpoints: list, count: int, **fields) -> None:
    """`count` deliveries spread over `endpoints`, 10,000 an INSERT."""
    # not at the top: the --serve process runs without Django
    from automation.models import WebhookDelivery

    for first in range(0, count, 10_000):
        WebhookDelivery.objects.bulk_create(
            WebhookDelivery(
                id=f"msg_{uuid.uuid4().hex}", endpoint=endpoints[i % len(endpoints)],
                event_type="run.completed", body='{"type":"run.completed"}', **fields,
            )
            for i in range(first, min(count, first + 10_000))
        )  # fmt: skip


def backlog_make(user, rows: int) -> None:
    """Once per database: a project of 3 dead endpoints (backed off) holding `rows`
    pending deliveries, all past due (what a day of a dead receiver leaves), and one live
    endpoint with `rows` delivered ones (its history) and 50 due (for --claim-plan)."""

    # not at the top: the --serve process runs without Django
    from django.utils import timezone

    from automation.models import WebhookEndpoint
    from projects.models import Project

    project, made = Project.objects.get_or_create(owner=user, name=f"hooks backlog {rows}")
    if not made:
        return
    now = timezone.now()

    def endpoint(**fields) -> WebhookEndpoint:
        return WebhookEndpoint.objects.create(
            project=project, url=closed_port_url(), events=["run.completed"],
            secret="whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", **fields,
        )  # fmt: skip

    dead = [endpoint(consecutive_failures=6, blocked_until=now + timedelta(days=1)) for _ in "abc"]
    deliveries_add(dead, rows, next_attempt_at=now - timedelta(hours=1))
    live = endpoint(description="claim plan", enabled=False)  # never drained by the bench
    deliveries_add([live], rows, status="delivered", delivered_at=now)
    deliveries_add([live], 50, next_attempt_at=now)


def claim_plan(user, rows: int) -> None:
    """EXPLAIN ANALYZE of a drain's claim (automation.delivery.claimable) of 50 deliveries
    of the backlog's live endpoint. The database is not migrated first: the plan before an
    index change is `manage.py migrate automation <earlier migration>` away."""
    # not at the top: the --serve process runs without Django
    from django.db import connection, transaction
    from django.utils import timezone

    from automation.delivery import claimable
    from automation.models import WebhookEndpoint

    endpoint = WebhookEndpoint.objects.get(
        project__owner=user, project__name=f"hooks backlog {rows}", description="claim plan"
    )
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE automation_webhookdelivery")
    for attempt in range(3):  # the last one warm
        with transaction.atomic():
            plan = claimable(endpoint.id, now=timezone.now(), limit=50).explain(
                analyze=True, buffers=True
            )
        print(f"claim {attempt + 1}: {plan.splitlines()[-1].strip()}")
    print(plan)


def main() -> None:
    if sys.argv[1:] == ["--serve"]:
        serve()
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--rate", type=float, default=0, help="completions per second (0: all at once)"
    )
    parser.add_argument(
        "--backlog",
        type=int,
        default=0,
        help="pending deliveries of dead endpoints in the table first (made once)",
    )
    parser.add_argument(
        "--claim-plan",
        action="store_true",
        help="print the claim's EXPLAIN ANALYZE beside the backlog and stop (no migrate)",
    )
    parser.add_argument("--dump", type=Path, help="a folder for each measurement's times")
    args = parser.parse_args()

    # not at the top: the --serve process runs without Django
    from django.conf import settings
    from django.contrib.auth import get_user_model
    from django.core.management import call_command

    if not args.claim_plan:
        call_command("migrate", verbosity=0)
    user, _ = get_user_model().objects.get_or_create(username="hooks-bench")
    if args.backlog:
        backlog_make(user, args.backlog)
    if args.claim_plan:
        print(f"backlog: {args.backlog} pending deliveries of dead endpoints")
        claim_plan(user, args.backlog)
        return
    log_dir = Path(os.environ["VAR_DIR"]) / f"logs-{int(time.time())}"
    log_dir.mkdir(parents=True)
    procs = [start(name, log_dir) for name in ("webhooks", "worker", "beat")]
    webhooks_pids = [procs[0].pid]
    time.sleep(8)  # the workers' start (no readiness probe on a dedicated worker's queue)
    print(
        f"runs={args.runs} rate={args.rate or 'burst'}/s; endpoints: 7 live + 3 down "
        "(refused, 500, hanging); "
        f"WEBHOOK_TIMEOUT_SECONDS={settings.WEBHOOK_TIMEOUT_SECONDS} "
        f"connect={settings.WEBHOOK_CONNECT_TIMEOUT_SECONDS} "
        f"backoff={settings.WEBHOOK_BACKOFF_SECONDS[:3]}...; webhooks worker: 50 threads"
    )
    rows = []
    try:
        cases = [("baseline 7 live", False), ("7 live + 3 down", True)]
        for r in range(args.rounds):
            # Which case goes first alternates: the first of a round was the slower.
            for label, dead in cases if r % 2 == 0 else cases[::-1]:
                load = os.getloadavg()[0]
                row = one(label, args.runs, dead, user, webhooks_pids, args.rate, args.dump)
                row["round"], row["load"] = r + 1, load
                rows.append(row)
                print(
                    f"round {r + 1} {label:<16} delivered {row['delivered']:<10} "
                    f"p50 {row['p50']:.3f}s p99 {row['p99']:.3f}s max {row['max']:.3f}s "
                    f"ending {row['ending_s']:.1f}s; dead: {row['dead_attempts']} attempts for "
                    f"{row['dead_events']} events, {row['dead_pending']} pending; webhooks "
                    f"worker CPU {row['cpu_ms_per_delivery']:.1f} ms/delivery  "
                    f"load {load:.2f}",
                    flush=True,
                )
    finally:
        for proc in procs:
            stop(proc)
    print()
    print(f"{'':<18}{'p99 live (s) min/median/max':<32}{'p50 live (s) median':<22}"
          f"{'dead attempts / events (median)':<32}")  # fmt: skip
    for label in ("baseline 7 live", "7 live + 3 down"):
        mine = [x for x in rows if x["label"] == label]
        p99s = [x["p99"] for x in mine]
        print(
            f"{label:<18}{min(p99s):.3f} / {statistics.median(p99s):.3f} / {max(p99s):.3f}"
            f"{'':<9}{statistics.median([x['p50'] for x in mine]):.3f}{'':<16}"
            f"{statistics.median([x['dead_attempts'] for x in mine]):.0f} / "
            f"{mine[0]['dead_events']}"
        )
    print(f"load average at the end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
