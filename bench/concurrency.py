"""Many conversations at once, fairness between tenants, and no tenant taking the
service down: measured on a real stack.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/<existing db> \\
    REDIS_URL=redis://127.0.0.1:6379/13 .venv/bin/python bench/concurrency.py [--rounds 3]

The stack runs as the Procfile starts it: uvicorn (one process) and one worker process
(the Procfile's pool: `--pool=threads --concurrency=100`), PostgreSQL, Redis (the bench FLUSHES that
database), Qdrant local mode and the bundled embedder in the worker, and a local
server speaking the OpenAI streaming protocol (tests/runtime/openai_server.py) that
takes --latency seconds per answer. Each measure runs --rounds times; the table gives
min / median / max.

Settings changed: the API's throttles (THROTTLE_{MESSAGES,SEARCHES,INGESTS}_{USER,PROJECT})
are raised to 1000000/min unless set, so the service's capacity is measured, not its
rate limits.

1. N chats posted together (one per session), LLM answer time --latency: wall time
   from the first POST to the last answer completed; against the worker as it ran
   before (prefork, one process: answers one after another) on the same N chats, run
   in the same round right after (about N x latency each round; --no-baseline leaves
   it out). Also the worker process's CPU per run (/proc, from the first POST to the
   last answer: what the worker does meanwhile besides runs, e.g. its start's warm-up,
   is in it). With --profile one more round records what the worker computes.
2. Time to first delta of project B's chat (offline provider) while project A ingests
   1,000 documents, against the same with nothing else running.
3. 5,000 event streams open on the one uvicorn process (10 per session of 500, the
   sessions of 25 users, opened 200 at once), on the service's stream settings: Redis
   connections the web process holds, its resident memory per stream (once the event
   reached them all, against before the first opened), the time and its CPU to open them
   all (until the hub follows every stream's key), the delay of a new event to every
   stream (p99, read in two client processes, whose own work is in the figure: they
   share the cores with the server), the web process's CPU time until the last stream
   had it, and the p99 of an ordinary API request meanwhile against the same with no
   stream open.
4. 500 context searches at once from one user while the worker is busy: what the
   other users' requests get (any 5xx?) and what the flooding user gets.
5. Chat messages per second end to end with the offline provider (with --profile, in
   one more round, where the worker's time goes: py-spy, the busiest functions).
6. --bursts (1,000 and 5,000) messages posted at once, one per session, LLM answer
   time --latency: the statuses (any 5xx but a 503 with Retry-After fails), whether a
   refused POST stored anything, when the last accepted message was answered, and the
   web process's CPU time per accepted POST (/proc, the warm-up excluded).
7. User A floods --flood context searches at once while user B searches 20 times (3
   with the worker stopped) and opens 20 event streams, one after another: B's search
   p99 against B alone, and the streams' open time; then the same with the worker
   stopped (every search waits out its 5 s timeout): B's must end at its own timeout,
   not after A's. The in-flight search bounds are the service's (most of A's flood is
   refused with 429), or --flood-inflight (above --flood: all of A's searches wait).
   With --profile one more round records where the web and worker processes' time
   goes (py-spy).
8. (Only when named: --only 8; it starts a PostgreSQL server of its own in a temporary
   folder, tests/private_postgres.py, and ignores DATABASE_URL.) Chat messages posted
   at 10/s for 20 s while PostgreSQL is killed for 8 s, then while it restarts fast;
   beat runs (the recovery pass), runs' leases are 6 s: 5xx other than 503, refusals
   without Retry-After, accepted messages not answered, finished runs without usage.

A round with py-spy attached (--profile) is never among the figures: py-spy pauses the
processes it samples. The POSTs of measures 1, 4, 5 and 6 go out through one client: a
connection per POST, HTTP/1.1 with h11 (httpx's client, at 1,000 connections in one
event loop, sent and read them seconds late).

Not measured here: more than one web or worker process, a remote Redis or database,
and a real LLM (its own latency is all the stub adds).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import multiprocessing
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Printed with the results: what this bench changes of the defaults.
if __name__ == "__main__":
    sys.path[:0] = [str(ROOT)]
    only_arg = sys.argv[sys.argv.index("--only") + 1] if "--only" in sys.argv[:-1] else ""
    if "8" in only_arg.split(","):
        # Measure 8 kills PostgreSQL: a server of its own, never a shared one.
        import atexit

        from tests.private_postgres import PrivatePostgres

        PRIVATE_POSTGRES = PrivatePostgres().init()
        atexit.register(PRIVATE_POSTGRES.destroy)
        os.environ["DATABASE_URL"] = PRIVATE_POSTGRES.url
    from bench.harness import bootstrap

    bootstrap("concurrency", capacity=True, offline=True)

import h11  # noqa: E402
import httpx  # noqa: E402
from django.contrib.auth import get_user_model  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.db import connections  # noqa: E402
from rest_framework.authtoken.models import Token  # noqa: E402

from agents.models import Agent  # noqa: E402
from bench.harness import THROTTLES_NOTE  # noqa: E402
from chat.models import ChatSession, Message, Run  # noqa: E402
from chat.streams import stream_key  # noqa: E402
from common.redis import get_redis  # noqa: E402
from governance.models import RunUsage  # noqa: E402
from projects.models import Project  # noqa: E402
from tests.runtime.openai_server import FakeOpenAI  # noqa: E402
from tests.workers import wait_until  # noqa: E402
from workspaces.redis import workspace_prefix  # noqa: E402


def procfile_worker_options() -> list[str]:
    """The pool options of the Procfile's `worker` line, at their defaults."""
    line = next(
        ln for ln in (ROOT / "Procfile").read_text().splitlines() if ln.startswith("worker:")
    )
    line = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", line)
    return [p for p in line.split() if p.startswith(("--pool=", "--concurrency="))]


PROCFILE_WORKER = procfile_worker_options()
# The worker as the Procfile started it before runs overlapped: one process, one run.
SEQUENTIAL_WORKER = ["--pool=prefork", "--concurrency=1"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    return " / ".join(fmt.format(v) for v in (min(values), statistics.median(values), max(values)))


class Stack:
    """uvicorn and one worker, as the Procfile starts them (`worker` args may differ)."""

    def __init__(self, *, worker: list[str], env: dict[str, str] | None = None, beat: bool = False):
        get_redis().flushdb()
        self.port = free_port()
        self.env = dict(os.environ, REMAP_SIGTERM="SIGQUIT", **(env or {}))
        self.env["QDRANT_PATH"] = tempfile.mkdtemp(prefix="bench-qdrant-")
        self.logs = tempfile.mkdtemp(prefix="bench-logs-")
        self.web = self._start(
            "web", "-m", "uvicorn", "config.asgi:application", "--host", "127.0.0.1",
            "--port", str(self.port), "--lifespan", "on", "--no-access-log",
        )  # fmt: skip
        self.worker = self._start(
            "worker", "-m", "celery", "-A", "config", "worker", "--loglevel=WARNING",
            "-Q", "uws.maintenance", "-n", f"bench-{uuid.uuid4().hex[:6]}@%h", *worker,
        )  # fmt: skip
        self.beat = None
        if beat:  # the recovery pass (agents.recover_runs)
            self.beat = self._start(
                "beat", "-m", "celery", "-A", "config", "beat", "--loglevel=WARNING",
                "-s", str(Path(self.logs) / "beat-schedule"),
            )  # fmt: skip
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/my/projects/", timeout=2).status_code == 401:
                    break
            time.sleep(0.2)
        deadline = time.monotonic() + 60
        while not get_redis().zcard("uws:bus:workers"):
            if time.monotonic() > deadline:
                raise SystemExit(f"the worker did not start; see {self.logs}")
            time.sleep(0.2)

    def _start(self, name: str, *argv: str) -> subprocess.Popen:
        log = open(Path(self.logs) / f"{name}.log", "wb")  # noqa: SIM115
        return subprocess.Popen(
            [sys.executable, *argv], cwd=ROOT, env=self.env, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

    def stop(self) -> None:
        for proc in (self.web, self.worker, *([self.beat] if self.beat else [])):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)


def setup_user(name: str) -> tuple:
    user, _ = get_user_model().objects.get_or_create(username=name)
    return user, Token.objects.get_or_create(user=user)[0].key


def project_with_sessions(user, *, sessions: int, model: str) -> tuple[Project, Agent, list]:
    project = Project.objects.create(owner=user, name=f"bench {uuid.uuid4().hex[:6]}")
    agent = Agent.objects.create(project=project, name="a", model=model, params={"top_k": 2})
    chats = ChatSession.objects.bulk_create(
        ChatSession(project=project, agent=agent) for _ in range(sessions)
    )
    return project, agent, chats


async def post_all(url: str, token: str, paths: list[str], body: dict) -> list[int]:
    """POST to every path at once; returns the status codes."""
    return [code for code, _ in await post_all_answers(url, token, paths, body)]


async def post_all_answers(url: str, token: str, paths: list[str], body: dict) -> list:
    """POST to every path at once, each on a connection of its own as separate clients
    would; returns (status, Retry-After) of each (599: no answer in 120 s).

    HTTP/1.1 through h11 straight on asyncio's sockets: httpx's client, at 1,000
    connections in one event loop, spent so long on its own pool that it sent the last
    POSTs and read the answers seconds late (the server's threads sat idle meanwhile), and
    the bench measured its client. This one costs the loop one read per answer."""
    port = int(url.rsplit(":", 1)[1])
    data = json.dumps(body).encode()

    async def post(path: str) -> tuple[int, str | None]:
        client = h11.Connection(h11.CLIENT)
        request = h11.Request(
            method="POST",
            target=path,
            headers=[
                ("Host", "127.0.0.1"),
                ("Authorization", f"Token {token}"),
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(data))),
                ("Connection", "close"),
            ],
        )
        writer = None
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(
                client.send(request)
                + client.send(h11.Data(data=data))
                + client.send(h11.EndOfMessage())
            )
            while True:
                event = client.next_event()
                if event is h11.NEED_DATA:
                    client.receive_data(await reader.read(65536))
                elif isinstance(event, h11.Response):
                    retry_after = dict(event.headers).get(b"retry-after")
                    return event.status_code, retry_after and retry_after.decode()
        except (OSError, h11.ProtocolError):
            return 599, None
        finally:
            if writer is not None:
                writer.close()

    async def timed(path: str) -> tuple[int, str | None]:
        try:
            return await asyncio.wait_for(post(path), 120)
        except TimeoutError:
            return 599, None

    return await asyncio.gather(*(timed(p) for p in paths))


def wait_runs_done(message_ids: list[int], timeout: float) -> float:
    """When the last of these answers finished (epoch seconds)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = (
            Run.objects.filter(message_id__in=message_ids).exclude(status__in=Run.FINISHED).count()
        )
        if not left:
            break
        time.sleep(0.1)
    else:
        raise SystemExit(f"{left} answers still running after {timeout} s")
    runs = Run.objects.filter(message_id__in=message_ids)
    if runs.exclude(status="done").exists():
        raise SystemExit(f"failed runs: {list(runs.exclude(status='done').values('error'))[:3]}")
    return max(r.finished_at.timestamp() for r in runs)


# --- 1. many chats at once -----------------------------------------------------------------


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def many_chats(
    chats: int, latency: float, worker: list[str], extra_env=None, profile: bool = False
) -> tuple[float, float, list[tuple[str, float]]]:
    """Wall time from the first POST to the last answer, and the worker process's CPU
    per run meanwhile (the process the worker was started as: its pool's, with threads);
    with `profile`, what the worker computes (py-spy, samples of the thread holding the
    GIL)."""
    fake = FakeOpenAI().start()
    fake.mode, fake.tokens = "slow", [f"w{i} " for i in range(10)]
    fake.delay = latency / len(fake.tokens)
    env = {"OPENAI_BASE_URL": fake.base_url, "OPENAI_API_KEY": "bench", **(extra_env or {})}
    stack = Stack(worker=worker, env=env)
    raw = Path(stack.logs) / "worker-profile.txt"
    try:
        user, token = setup_user("bench-chats")
        project, _, sessions = project_with_sessions(user, sessions=chats, model="bench-model")
        paths = [f"/my/projects/{project.id}/chat/{s.id}/messages/" for s in sessions]
        with profiled(stack.worker.pid, raw, on=profile, gil=True):
            cpu = process_cpu(stack.worker.pid)
            started = time.time()
            codes = asyncio.run(post_all(stack.url, token, paths, {"content": "hello?"}))
            assert set(codes) == {202}, collections.Counter(codes)
            answers = list(
                Message.objects.filter(session__in=sessions, role="assistant").values_list(
                    "id", flat=True
                )
            )
            last = wait_runs_done(answers, timeout=chats * latency + 120)
            wall, cpu = last - started, (process_cpu(stack.worker.pid) - cpu) / chats
        return wall, cpu, profile_top(raw, n=15, whole=True) if profile else []
    finally:
        stack.stop()
        fake.stop()


# --- 2. an interactive chat while another project ingests ----------------------------------------


def ttfd_while_ingesting(samples: int, ingesting: bool) -> list[float]:
    stack = Stack(worker=PROCFILE_WORKER)
    try:
        user_a, token_a = setup_user("bench-bulk")
        user_b, token_b = setup_user("bench-chat")
        project_a, agent_a, _ = project_with_sessions(user_a, sessions=0, model="offline")
        project_b, _, (session_b,) = project_with_sessions(user_b, sessions=1, model="offline")
        if ingesting:
            words = "agent context project worker queue stream vector search answer".split()
            docs = [" ".join(words[(i + j) % len(words)] for j in range(70)) for i in range(1000)]
            url = f"{stack.url}/my/projects/{project_a.id}/agents/{agent_a.id}/context/"
            for i in range(0, 1000, 100):
                response = httpx.post(
                    url, json={"documents": docs[i : i + 100]}, timeout=30,
                    headers={"Authorization": f"Token {token_a}"},
                )  # fmt: skip
                assert response.status_code == 202, response.text
            time.sleep(3)  # the ingest is under way
        delays = []
        messages = f"{stack.url}/my/projects/{project_b.id}/chat/{session_b.id}/messages/"
        with httpx.Client(headers={"Authorization": f"Token {token_b}"}) as client:
            for i in range(samples + 1):
                sent = time.time()
                answer = client.post(messages, json={"content": f"question {i}?"}).json()
                wait_runs_done([answer["assistant_message_id"]], timeout=120)
                first = first_delta_at(user_b.pk, project_b.id, session_b.id, answer)
                if i:  # the first one warms the worker's queue and the embedder
                    delays.append(first - sent)
        return delays
    finally:
        stack.stop()


def first_delta_at(user_id, project_id, session_id, answer) -> float:

    key = workspace_prefix(user_id, project_id) + stream_key(session_id)
    for entry_id, fields in get_redis().xrange(key):
        if (
            fields["type"] == "message.delta"
            and f'"message_id":{answer["assistant_message_id"]}' in fields["data"]
        ):
            return int(entry_id.split("-")[0]) / 1000
    raise SystemExit("no delta")


# --- 3. thousands of event streams ------------------------------------------------------------


async def open_stream(port: int, path: str, token: str):
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=2**20)
    writer.write(
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Token {token}\r\n"
        "Accept: text/event-stream\r\n\r\n".encode()
    )
    await writer.drain()
    try:
        head = await reader.readuntil(b"connected at")
    except asyncio.IncompleteReadError as exc:  # answered and closed: say with what
        raise RuntimeError(exc.partial[:300]) from None
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(head[:200])
    return reader, writer


class StreamClient(asyncio.Protocol):
    """One event stream read as the bytes come (no StreamReader, no task per stream):
    `opened` once the server said it is connected, `arrived` the monotonic time the
    bench's event reached it."""

    def __init__(self, request: bytes, mark: bytes) -> None:
        self.request, self.mark, self.buffer = request, mark, b""
        self.opened = asyncio.get_running_loop().create_future()
        self.arrived: float | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        if self.arrived is not None:
            return
        self.buffer += data
        if not self.opened.done():
            if b"\r\n\r\n" in self.buffer and not self.buffer.startswith(b"HTTP/1.1 200"):
                self.opened.set_exception(RuntimeError(self.buffer[:300]))
            elif b"connected at" in self.buffer:
                self.opened.set_result(None)
                self.buffer = b""
        elif self.mark in self.buffer:
            self.arrived = time.monotonic()
            self.buffer = b""
        else:
            self.buffer = self.buffer[-len(self.mark) :]  # heartbeats

    def connection_lost(self, exc) -> None:
        if not self.opened.done():
            self.opened.set_exception(RuntimeError(self.buffer[:300] or "closed"))


def stream_client_process(port: int, requests: list[bytes], mark: bytes, conn) -> None:
    """A measuring client in a process of its own: opens its streams in waves of 200
    (as clients arrive), says so, then sends back when each one received `mark`, and
    closes them all when told."""

    async def run():
        loop = asyncio.get_running_loop()
        clients = []
        try:
            for i in range(0, len(requests), 200):
                wave = [StreamClient(r, mark) for r in requests[i : i + 200]]
                await asyncio.gather(
                    *(loop.create_connection(lambda c=c: c, "127.0.0.1", port) for c in wave)
                )
                await asyncio.gather(*(c.opened for c in wave))
                clients += wave
        except Exception as exc:  # noqa: BLE001 (reported to the bench, which stops)
            conn.send(("error", repr(exc)))
            return
        conn.send(("open", len(clients)))
        deadline = time.monotonic() + 60
        while any(c.arrived is None for c in clients) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        conn.send(("arrived", [c.arrived for c in clients]))
        await loop.run_in_executor(None, conn.recv)  # "close"
        for client in clients:
            client.transport.close()

    asyncio.run(run())
    conn.close()


def web_redis_clients(stack: Stack) -> int:
    """Redis connections the web process holds: the TCP sockets among its open files
    whose peer is Redis's port (/proc/<pid>/net/tcp lists every socket of the host's
    network namespace, so it is matched by inode)."""
    redis_port = int(os.environ["REDIS_URL"].rsplit(":", 1)[1].split("/")[0])
    inodes = set()
    for fd in Path(f"/proc/{stack.web.pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    held = 0
    for line in Path(f"/proc/{stack.web.pid}/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[2].split(":")[1], 16) == redis_port and fields[9] in inodes:
            held += 1
    return held


def api_p99(url: str, token: str, n: int = 200) -> float:
    times = []
    with httpx.Client(headers={"Authorization": f"Token {token}"}) as client:
        for _ in range(n):
            started = time.perf_counter()
            assert client.get(url).status_code == 200
            times.append(time.perf_counter() - started)
    return pct(times, 99)


def many_streams(streams: int, *, users: int = 25, sessions: int = 500, processes: int = 2) -> dict:
    """`streams` event streams over `sessions` sessions (as many per session), the
    sessions shared by `users` users (a project each), opened in waves of 200 by
    `processes` client processes (a wave asks about 200/users streams of each user at
    once: within the service's per-credential bound on requests being set up). One
    event is written to every session's stream; its delay to each stream is measured in
    the client processes, as each reads its sockets (their own work is in the figure:
    the client processes share the machine's cores with the server)."""

    stack = Stack(worker=PROCFILE_WORKER)
    children = []
    try:
        tokens, paths, keys, projects = [], [], [], []
        for u in range(users):
            user, token = setup_user(f"bench-streams-{u}")
            project, _, own = project_with_sessions(
                user, sessions=sessions // users, model="offline"
            )
            tokens.append(token)
            projects.append(project)
            paths.append([f"/my/projects/{project.id}/chat/{s.id}/events/" for s in own])
            keys += [workspace_prefix(user.pk, project.id) + stream_key(s.id) for s in own]
        # Stream j: user j % users, its session (j // users) % its sessions.
        requests = [
            (
                f"GET {paths[j % users][(j // users) % len(paths[0])]} HTTP/1.1\r\n"
                f"Host: 127.0.0.1\r\nAuthorization: Token {tokens[j % users]}\r\n"
                "Accept: text/event-stream\r\n\r\n"
            ).encode()
            for j in range(streams)
        ]
        detail = f"{stack.url}/my/projects/{projects[0].id}/"
        idle_p99 = api_p99(detail, tokens[0])
        idle_clients = web_redis_clients(stack)
        idle_rss = web_rss_mb(stack)
        mark = f"bench-{uuid.uuid4().hex}".encode()
        fork = multiprocessing.get_context("fork")  # before any event loop of this process
        open_cpu, opening = web_cpu_seconds(stack), time.monotonic()
        for n in range(processes):
            ours, theirs = fork.Pipe()
            child = fork.Process(
                target=stream_client_process,
                args=(stack.port, requests[n::processes], mark, theirs),
                daemon=True,
            )
            child.start()
            children.append((child, ours))
        for _, conn in children:
            state, said = conn.recv()
            if state != "open":
                raise SystemExit(f"a stream did not open: {said}")
        # The hub follows every key (its pub/sub connection subscribed) before the event.
        wait_until(
            lambda: all(n for _, n in get_redis().pubsub_numsub(*keys)),
            60,
            "the hub to subscribe to every stream's key",
            interval=0.05,
        )
        cpu = web_cpu_seconds(stack)
        open_cpu, opening = cpu - open_cpu, time.monotonic() - opening
        sent = time.monotonic()
        pipe = get_redis().pipeline(transaction=False)
        for key in keys:  # as a worker writes an event: XADD, then the notification
            pipe.xadd(key, {"type": "message.delta", "data": f'{{"bench": "{mark.decode()}"}}'})
            pipe.publish(key, "")
        pipe.execute()
        arrivals = []
        for _, conn in children:
            arrivals += conn.recv()[1]
        if None in arrivals:
            raise SystemExit(f"{arrivals.count(None)} streams did not get the event in 60 s")
        cpu = web_cpu_seconds(stack) - cpu
        clients = web_redis_clients(stack)
        rss_per_stream = (web_rss_mb(stack) - idle_rss) * 1024 / streams
        loaded_p99 = api_p99(detail, tokens[0])
        return {
            "clients": clients,
            "idle_clients": idle_clients,
            "delay_p99": pct([a - sent for a in arrivals], 99),
            "web_cpu": cpu,
            "rss_kb_per_stream": rss_per_stream,
            "open_s": opening,
            "open_web_cpu": open_cpu,
            "api_idle_p99": idle_p99,
            "api_loaded_p99": loaded_p99,
        }
    finally:
        for child, conn in children:
            with contextlib.suppress(OSError):
                conn.send("close")
            child.join(30)
        stack.stop()


# --- 4. a flood of searches -----------------------------------------------------------------


def search_flood(searches: int) -> dict:
    fake = FakeOpenAI().start()
    fake.mode, fake.tokens, fake.delay = "slow", ["x "] * 40, 0.5  # 20 s answers
    env = {"OPENAI_BASE_URL": fake.base_url, "OPENAI_API_KEY": "bench",
           "CONTEXT_SEARCH_TIMEOUT_SECONDS": "5"}  # fmt: skip
    stack = Stack(worker=PROCFILE_WORKER, env=env)
    try:
        flooder, flood_token = setup_user("bench-flooder")
        other, other_token = setup_user("bench-other")
        busy, _, busy_sessions = project_with_sessions(flooder, sessions=40, model="bench-model")
        target, agent, _ = project_with_sessions(flooder, sessions=0, model="offline")
        theirs, _, (their_session,) = project_with_sessions(other, sessions=1, model="offline")
        # The worker is busy: 40 long answers hold most of its threads.
        asyncio.run(post_all(stack.url, flood_token, [
            f"/my/projects/{busy.id}/chat/{s.id}/messages/" for s in busy_sessions
        ], {"content": "go on"}))  # fmt: skip
        time.sleep(1)

        async def run():
            search = f"{stack.url}/my/projects/{target.id}/agents/{agent.id}/context/?q=hello"
            mine = {"Authorization": f"Token {flood_token}"}
            limits = httpx.Limits(max_connections=searches + 50)
            theirs_urls = [
                f"{stack.url}/my/projects/{theirs.id}/",
                f"{stack.url}/my/projects/{theirs.id}/chat/{their_session.id}/messages/",
            ]
            async with (
                httpx.AsyncClient(headers=mine, limits=limits) as flood,
                httpx.AsyncClient(headers={"Authorization": f"Token {other_token}"}) as them,
            ):

                async def theirs_requests():
                    codes = []
                    for _ in range(30):
                        for url in theirs_urls:
                            codes.append((await them.get(url, timeout=30)).status_code)
                        await asyncio.sleep(0.05)
                    return codes

                flooding = asyncio.gather(
                    *(flood.get(search, timeout=30) for _ in range(searches)),
                    return_exceptions=True,
                )
                other_codes = await theirs_requests()
                answers = await flooding
            codes = [a.status_code if isinstance(a, httpx.Response) else 599 for a in answers]
            return codes, other_codes

        flood_codes, other_codes = asyncio.run(run())
        return {
            "flood": collections.Counter(flood_codes),
            "others": collections.Counter(other_codes),
        }
    finally:
        stack.stop()
        fake.stop()


# --- 5. messages per second, and a profile ------------------------------------------------------


def throughput(messages: int, profile: bool) -> tuple[float, list[tuple[str, float]]]:
    stack = Stack(worker=PROCFILE_WORKER)
    try:
        user, token = setup_user("bench-throughput")
        project, _, sessions = project_with_sessions(user, sessions=messages, model="offline")
        paths = [f"/my/projects/{project.id}/chat/{s.id}/messages/" for s in sessions]
        # Warm: the workspace, the queue, the embedder.
        asyncio.run(post_all(stack.url, token, paths[:2], {"content": "warm up"}))
        wait_runs_done(
            list(
                Message.objects.filter(role="assistant", session__in=sessions[:2]).values_list(
                    "id", flat=True
                )
            ),
            120,
        )
        raw = Path(stack.logs) / "profile.txt"
        with profiled(stack.worker.pid, raw, on=profile):
            started = time.time()
            asyncio.run(post_all(stack.url, token, paths[2:], {"content": "what do you know?"}))
            answers = list(
                Message.objects.filter(role="assistant", session__in=sessions[2:]).values_list(
                    "id", flat=True
                )
            )
            last = wait_runs_done(answers, timeout=600)
        return len(answers) / (last - started), profile_top(raw) if profile else []
    finally:
        stack.stop()


def spy_start(pid: int, raw: Path, *, gil: bool = False) -> subprocess.Popen:
    """py-spy recording process `pid` (every thread) into `raw` until SIGINT; with `gil`,
    only the thread holding the GIL (what the process computes in Python, not where its
    threads wait)."""
    spy = subprocess.Popen(
        [str(Path(sys.executable).parent / "py-spy"), "record", "--format", "raw",
         "--rate", "200", "--threads", *(["--gil"] if gil else []), "-o", str(raw),
         "--pid", str(pid)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    time.sleep(1)
    return spy


def spy_stop(spy: subprocess.Popen) -> None:
    """Stop a recording; its file is written as py-spy exits."""
    spy.send_signal(signal.SIGINT)
    try:
        spy.wait(60)
    except subprocess.TimeoutExpired:
        spy.kill()
        spy.wait()


@contextlib.contextmanager
def profiled(pid: int, raw: Path, *, on: bool, gil: bool = False) -> Iterator[None]:
    """With `on`, py-spy records process `pid` into `raw` while the block runs (spy_start)."""
    spy = spy_start(pid, raw, gil=gil) if on else None
    try:
        yield
    finally:
        if spy is not None:
            spy_stop(spy)


def profile_top(raw: Path, n: int = 12, whole: bool = False) -> list[tuple[str, float]]:
    """Where the runs' time goes: each sample of a thread inside our code counts for the
    innermost function of ours on its stack (so time in Redis, the database, Qdrant or
    the embedder counts for the function of ours that called it). Threads outside our
    code (idle pool threads, Celery's own loop) are left out. With `whole`, every
    sample counts (the web process: Django, DRF and uvicorn are most of it), each for
    the innermost frame of ours, else of Django / DRF, else its own."""
    apps = ("agents", "agentbus", "workspaces", "projects", "common", "governance", "chat",
            "context", "realtime")  # fmt: skip
    ours = tuple(f"({app}/" for app in apps)
    frameworks = ("/django/", "/rest_framework/", "/uvicorn/", "/asgiref/", "/psycopg")
    counts: collections.Counter = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        leaf = stack.rsplit(";", 1)[-1]
        # Idle: waiting on a lock, or a pool's thread waiting for work (a C call).
        if whole and (
            "idle" in stack or "wait (threading.py" in leaf or "_worker (concurrent/" in leaf
        ):
            continue
        frames = [f for f in stack.split(";") if any(app in f for app in ours)]
        if not frames and whole:
            frames = [f for f in stack.split(";") if any(x in f for x in frameworks)] or [
                stack.split(";")[-1]
            ]
        if not frames:
            continue
        total += int(count)
        name, _, where = frames[-1].partition(" (")
        counts[f"{name} ({where.split(':')[0]})"] += int(count)
    return [(name, 100 * c / total) for name, c in counts.most_common(n)]


# --- 6. a burst of messages: absorbed or refused cleanly ----------------------------------------


def web_rss_mb(stack: Stack) -> float:
    """Resident memory of the web process now (MB)."""
    for line in Path(f"/proc/{stack.web.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def web_cpu_seconds(stack: Stack) -> float:
    """User + system CPU time of the web process so far."""
    fields = Path(f"/proc/{stack.web.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def burst(messages: int, latency: float, profile: bool = False) -> dict:
    """`messages` chat messages posted at once (one per session), LLM answer time
    `latency`: what each POST got, whether a refusal stored anything, when the last
    accepted message was answered, and the web process's CPU per accepted POST."""
    fake = FakeOpenAI().start()
    fake.mode, fake.tokens = "slow", [f"w{i} " for i in range(10)]
    fake.delay = latency / len(fake.tokens)
    stack = Stack(
        worker=PROCFILE_WORKER, env={"OPENAI_BASE_URL": fake.base_url, "OPENAI_API_KEY": "bench"}
    )
    try:
        user, token = setup_user(f"bench-burst-{uuid.uuid4().hex[:6]}")
        # One session more than the burst: the first is the warm-up's.
        project, _, sessions = project_with_sessions(
            user, sessions=messages + 1, model="bench-model"
        )
        paths = [f"/my/projects/{project.id}/chat/{s.id}/messages/" for s in sessions]
        # Warm: the workspace, its queue, the pool's connections.
        warm = asyncio.run(post_all_answers(stack.url, token, paths[:1], {"content": "warm"}))
        assert warm[0][0] == 202, warm
        paths = paths[1:]
        raw = Path(stack.logs) / "web-profile.txt"
        with profiled(stack.web.pid, raw, on=profile):
            cpu = web_cpu_seconds(stack)
            started = time.time()
            answers = asyncio.run(post_all_answers(stack.url, token, paths, {"content": "hello?"}))
            posted = time.time() - started
            cpu = web_cpu_seconds(stack) - cpu
        top = profile_top(raw, n=15, whole=True) if profile else []
        codes = collections.Counter(code for code, _ in answers)
        accepted = codes.get(202, 0)
        refused_without_retry = sum(
            1 for code, retry in answers if code in (429, 503) and not retry
        )
        stored = Message.objects.filter(session__in=sessions[1:], role="user").count()
        ids = list(
            Message.objects.filter(session__in=sessions[1:], role="assistant").values_list(
                "id", flat=True
            )
        )
        last = wait_runs_done(ids, timeout=messages * latency + 300) - started if ids else 0.0
        return {
            "codes": dict(sorted(codes.items())),
            "accepted": accepted,
            "stored_beyond_accepted": stored - accepted,
            "refused_without_retry_after": refused_without_retry,
            "posted_s": posted,
            "last_answer_s": last,
            "cpu_ms_per_accepted": 1e3 * cpu / max(accepted, 1),
            "profile": top,
        }
    finally:
        stack.stop()
        fake.stop()


# --- 7. one tenant's flood of waiting searches against another's search and stream ----------


async def _timed_get(client: httpx.AsyncClient, url: str) -> tuple[int, float]:
    started = time.perf_counter()
    try:
        response = await client.get(url, timeout=60)
        code = response.status_code
    except httpx.HTTPError:
        code = 599
    return code, time.perf_counter() - started


async def _stream_open(port: int, path: str, token: str) -> float:
    started = time.perf_counter()
    _, writer = await open_stream(port, path, token)
    took = time.perf_counter() - started
    writer.close()
    return took


def tenant_isolation(
    flood: int, worker_up: bool, samples: int = 20, inflight: int = 0, profile: bool = False
) -> dict:
    """User A sends `flood` context searches at once (each may wait for the worker);
    meanwhile user B searches `samples` times, one after another, and opens event
    streams. Against B alone. With `worker_up` False the worker is stopped first, so
    every search waits out CONTEXT_SEARCH_TIMEOUT_SECONDS (5 here). `inflight`: the
    per-user and per-project bounds on waiting searches (SEARCH_INFLIGHT_PER_*; 0: the
    service's defaults, so most of A's flood is refused with 429). With `profile`, where
    the web process's and the worker's time goes during the flood (py-spy)."""
    env = {"CONTEXT_SEARCH_TIMEOUT_SECONDS": "5"}
    if inflight:
        env |= {"SEARCH_INFLIGHT_PER_USER": str(inflight),
                "SEARCH_INFLIGHT_PER_PROJECT": str(inflight)}  # fmt: skip
    stack = Stack(worker=PROCFILE_WORKER, env=env)
    spies: list = []
    try:
        user_a, token_a = setup_user("bench-flood-a")
        user_b, token_b = setup_user("bench-flood-b")
        project_a, agent_a, _ = project_with_sessions(user_a, sessions=0, model="offline")
        project_b, agent_b, (session_b,) = project_with_sessions(
            user_b, sessions=1, model="offline"
        )
        search_a = f"{stack.url}/my/projects/{project_a.id}/agents/{agent_a.id}/context/?q=hello"
        search_b = f"{stack.url}/my/projects/{project_b.id}/agents/{agent_b.id}/context/?q=hello"
        events_b = f"/my/projects/{project_b.id}/chat/{session_b.id}/events/"
        with httpx.Client() as client:  # warm: the worker's embedder, both workspaces
            for url, token in ((search_a, token_a), (search_b, token_b)):
                client.get(url, headers={"Authorization": f"Token {token}"}, timeout=120)
        if not worker_up:
            os.killpg(stack.worker.pid, signal.SIGKILL)
            stack.worker.wait(30)

        async def b_side(client):
            # With no worker each search takes its whole timeout: three say enough.
            count = samples if worker_up else 3
            searches = [await _timed_get(client, search_b) for _ in range(count)]
            opens = [await _stream_open(stack.port, events_b, token_b) for _ in range(samples)]
            return searches, opens

        async def run(with_flood: bool):
            limits = httpx.Limits(max_connections=flood + 10)
            async with (
                httpx.AsyncClient(
                    headers={"Authorization": f"Token {token_a}"}, limits=limits
                ) as a,
                httpx.AsyncClient(headers={"Authorization": f"Token {token_b}"}) as b,
            ):
                flooding = None
                if with_flood:
                    if profile:
                        procs = [stack.web] + ([stack.worker] if worker_up else [])
                        spies.extend(
                            (p, spy_start(p.pid, Path(stack.logs) / f"spy-{p.pid}.txt"))
                            for p in procs
                        )
                    flooding = asyncio.gather(*(_timed_get(a, search_a) for _ in range(flood)))
                    await asyncio.sleep(0.5)  # A's searches are in
                mine = await b_side(b)
                theirs = await flooding if flooding is not None else []
            return mine, theirs

        (idle_searches, idle_opens), _ = asyncio.run(run(False)) if worker_up else (([], []), [])
        (searches, opens), flood_answers = asyncio.run(run(True))
        tops = {}
        for proc, spy in spies:
            spy_stop(spy)
            name = "web" if proc is stack.web else "worker"
            tops[name] = profile_top(Path(stack.logs) / f"spy-{proc.pid}.txt", n=15, whole=True)
        return {
            "profile": tops,
            "b_idle_p99": pct([t for _, t in idle_searches], 99) if idle_searches else None,
            "b_p99": pct([t for _, t in searches], 99),
            "b_codes": dict(collections.Counter(c for c, _ in searches)),
            "a_codes": dict(collections.Counter(c for c, _ in flood_answers)),
            "a_max": max(t for _, t in flood_answers),
            "b_max": max(t for _, t in searches),
            "open_p99": pct(opens, 99),
            "open_idle_p99": pct(idle_opens, 99) if idle_opens else None,
        }
    finally:
        stack.stop()


# --- 8. PostgreSQL killed, or restarted, under chat load ------------------------------------


def database_fault(fault: str, *, seconds: float = 20, rate: float = 10, outage: float = 8) -> dict:
    """Chat messages posted at `rate` a second for `seconds` (a session each, a model
    answering in 0.5 s) while PostgreSQL (the bench's own server) is killed
    (`-m immediate`) for `outage` seconds at 5 s, or restarted (`-m fast`) at 5 s. Then
    every accepted message must be answered and every finished run have its usage row.
    Runs' leases are 6 s and recovery runs every 5 s here (beat runs), so a run whose
    worker lost the database is dispatched again within seconds."""
    server = PRIVATE_POSTGRES  # noqa: F821  (set at start for --only 8)

    fake = FakeOpenAI().start()
    fake.mode, fake.tokens = "slow", [f"w{i} " for i in range(5)]
    fake.delay = 0.1
    env = {"OPENAI_BASE_URL": fake.base_url, "OPENAI_API_KEY": "bench",
           "RUN_LEASE_SECONDS": "6", "RUN_RECOVERY_SECONDS": "5",
           "RUN_REDISPATCH_SECONDS": "5"}  # fmt: skip
    stack = Stack(worker=PROCFILE_WORKER, env=env, beat=True)
    try:
        user, token = setup_user(f"bench-fault-{uuid.uuid4().hex[:6]}")
        count = int(seconds * rate)
        project, _, sessions = project_with_sessions(user, sessions=count, model="bench-model")
        paths = [f"/my/projects/{project.id}/chat/{s.id}/messages/" for s in sessions]

        async def load():
            answers: list = []
            async with httpx.AsyncClient(headers={"Authorization": f"Token {token}"}) as client:

                async def one(path):
                    try:
                        r = await client.post(stack.url + path, json={"content": "hi"}, timeout=60)
                        answers.append((r.status_code, r.headers.get("Retry-After")))
                    except httpx.HTTPError:
                        answers.append((599, None))

                async def strike():
                    await asyncio.sleep(5)
                    if fault == "kill":
                        await asyncio.to_thread(server.kill)
                        await asyncio.sleep(outage)
                        await asyncio.to_thread(server.start)
                    else:
                        await asyncio.to_thread(server.restart_fast)

                tasks = [asyncio.create_task(strike())]
                for path in paths:  # at `rate`, whatever the server does meanwhile
                    tasks.append(asyncio.create_task(one(path)))
                    await asyncio.sleep(1 / rate)
                await asyncio.gather(*tasks)
            return answers

        answers = asyncio.run(load())
        codes = collections.Counter(code for code, _ in answers)

        connections.close_all()  # the bench's own connections died with the server
        ids = list(
            Message.objects.filter(session__in=sessions, role="assistant").values_list(
                "id", flat=True
            )
        )
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if not Run.objects.filter(message_id__in=ids).exclude(status__in=Run.FINISHED).count():
                break
            time.sleep(0.5)
        runs = Run.objects.filter(message_id__in=ids)
        finished = runs.filter(status__in=Run.FINISHED)
        without_usage = finished.exclude(
            id__in=RunUsage.objects.filter(run_id__in=runs.values("id")).values("run_id")
        )
        return {
            "codes": dict(sorted(codes.items())),
            "five_hundreds": sum(n for c, n in codes.items() if c >= 500 and c != 503),
            "refused_without_retry_after": sum(1 for c, r in answers if c in (429, 503) and not r),
            "accepted": codes.get(202, 0),
            "stored": len(ids),
            "answered": runs.filter(status=Run.Status.DONE).count(),
            "errors": runs.filter(status=Run.Status.ERROR).count(),
            "unfinished": runs.exclude(status__in=Run.FINISHED).count(),
            "without_usage": without_usage.count(),
        }
    finally:
        stack.stop()
        fake.stop()


# --- report -------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--chats", type=int, default=100)
    parser.add_argument("--latency", type=float, default=2.0)
    parser.add_argument("--streams", type=int, default=5000)
    parser.add_argument("--searches", type=int, default=500)
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--bursts", default="1000,5000", help="6: messages posted at once")
    parser.add_argument("--flood", type=int, default=120, help="7: user A's searches at once")
    parser.add_argument(
        "--flood-inflight", type=int, default=0, metavar="N",
        help="7: SEARCH_INFLIGHT_PER_USER/_PROJECT (0: the defaults; above --flood, all of "
        "A's searches wait instead of the excess being refused)",
    )  # fmt: skip
    parser.add_argument(
        "--only", default="1,2,3,4,5,6,7", help="8 (PostgreSQL faults) runs on its own server"
    )
    parser.add_argument(
        "--profile", action="store_true",
        help="1, 5, 6, 7: where the processes' time goes (py-spy) in one more round of each, "
        "left out of the figures (py-spy pauses the processes to sample them)",
    )  # fmt: skip
    parser.add_argument(
        "--no-baseline", action="store_true",
        help="1: without the worker as before (about N x latency a round)",
    )  # fmt: skip
    opts = parser.parse_args()
    only = set(opts.only.split(","))
    call_command("migrate", verbosity=0)
    rows = []
    chats_top: list = []

    def row(name: str, values, fmt: str = "{:.2f}", goal: str = "") -> None:
        rows.append((name, spread(values, fmt) if isinstance(values, list) else values, goal))
        print(f"{name}: {rows[-1][1]}", flush=True)  # as it goes; the table comes at the end

    if "1" in only:
        n = opts.chats
        # Paired: each round times the Procfile's worker, then the worker as before on the
        # same N chats (measured, not scaled from fewer).
        pairs = [
            (
                many_chats(n, opts.latency, PROCFILE_WORKER),
                None if opts.no_baseline else many_chats(n, opts.latency, SEQUENTIAL_WORKER),
            )
            for _ in range(opts.rounds)
        ]
        wall = [w for (w, _, _), _ in pairs]
        row(f"{n} chats at once, {opts.latency:g} s LLM latency: wall time (s)", wall, goal="<= 3")
        row("  worker CPU per run (ms)", [c * 1e3 for (_, c, _), _ in pairs], "{:.1f}")
        if opts.profile:
            chats_top = many_chats(n, opts.latency, PROCFILE_WORKER, profile=True)[2]
        if not opts.no_baseline:
            seq = [s for _, (s, _, _) in pairs]
            row(f"  the worker as before (prefork, one process), same {n} chats (s)", seq)
            ratios = [s / w for w, s in zip(wall, seq, strict=True)]
            row("  ratio, paired per round (before / now)", ratios, "{:.0f}x")
    if "2" in only:
        idle = [statistics.median(ttfd_while_ingesting(10, False)) for _ in range(opts.rounds)]
        bulk = [statistics.median(ttfd_while_ingesting(10, True)) for _ in range(opts.rounds)]
        ms = "{:.0f}"
        row("project B's time to first delta, idle (ms, median of 10)", [v * 1e3 for v in idle], ms)
        row("  while project A ingests 1,000 documents (ms)", [v * 1e3 for v in bulk], ms)
        row("  ratio", [b / i for b, i in zip(bulk, idle, strict=True)], goal="<= 2x")
    if "3" in only:
        results = [many_streams(opts.streams) for _ in range(opts.rounds)]
        held = [r["clients"] for r in results]
        row(
            f"{opts.streams:,} streams: Redis connections of the web process",
            held,
            "{:.0f}",
            "<= 10",
        )
        row("  with no stream open", [r["idle_clients"] for r in results], "{:.0f}")
        row("  web process memory per stream (KB)",
            [r["rss_kb_per_stream"] for r in results], "{:.1f}")  # fmt: skip
        row("  time to open them all (s)", [r["open_s"] for r in results], "{:.1f}")
        row("  web process CPU to open them (s)", [r["open_web_cpu"] for r in results], "{:.1f}")
        delays = [r["delay_p99"] * 1e3 for r in results]
        row("  new event to every stream, p99 (ms)", delays, "{:.0f}", "<= 250")
        row("  web process CPU until the last stream had it (ms)",
            [r["web_cpu"] * 1e3 for r in results], "{:.0f}")  # fmt: skip
        idle_p99 = [r["api_idle_p99"] * 1e3 for r in results]
        loaded_p99 = [r["api_loaded_p99"] * 1e3 for r in results]
        row("  other API request p99, no stream open (ms)", idle_p99, "{:.1f}")
        row("  other API request p99, with the streams open (ms)", loaded_p99, "{:.1f}", "<= 2x")
    if "4" in only:
        results = [search_flood(opts.searches) for _ in range(opts.rounds)]
        fives = [sum(n for code, n in r["others"].items() if code >= 500) for r in results]
        row(f"{opts.searches} searches at once from one user: others' 5xx", fives, "{:.0f}", "0")
        for r in results:
            rows.append(
                ("  the flooding user got (status: count)", dict(sorted(r["flood"].items())), "")
            )
    if "5" in only:
        rates = [throughput(opts.messages, profile=False)[0] for _ in range(opts.rounds)]
        top = throughput(opts.messages, profile=True)[1] if opts.profile else []
        row("chat messages per second, offline provider, one worker process", rates, "{:.1f}")
    web_top: list = []
    flood_top: dict = {}
    if "6" in only:
        for size in (int(n) for n in opts.bursts.split(",")):
            results = [burst(size, opts.latency) for _ in range(opts.rounds)]
            fives = [
                sum(n for c, n in r["codes"].items() if c >= 500 and c != 503) for r in results
            ]
            row(f"{size:,} messages posted at once, {opts.latency:g} s LLM: 5xx other than 503",
                fives, "{:.0f}", "0")  # fmt: skip
            row("  accepted (202)", [r["accepted"] for r in results], "{:.0f}",
                f"{size:,}" if size <= 1000 else "")  # fmt: skip
            for r in results:
                rows.append(("  statuses (status: count)", r["codes"], ""))
            no_retry = [r["refused_without_retry_after"] for r in results]
            row("  refusals without Retry-After", no_retry, "{:.0f}", "0")
            row("  messages stored beyond those accepted",
                [r["stored_beyond_accepted"] for r in results], "{:.0f}", "0")  # fmt: skip
            row("  last POST answered (s)", [r["posted_s"] for r in results])
            row("  last accepted message answered (s)", [r["last_answer_s"] for r in results],
                goal="<= 10" if size <= 1000 else "")  # fmt: skip
            cpu = [r["cpu_ms_per_accepted"] for r in results]
            row("  web CPU per accepted chat POST (ms)", cpu, "{:.1f}", "<= 8")
            if opts.profile and not web_top:
                web_top = burst(size, opts.latency, profile=True)["profile"]
    if "7" in only:
        ms = "{:.0f}"
        up = [
            tenant_isolation(opts.flood, True, inflight=opts.flood_inflight)
            for _ in range(opts.rounds)
        ]
        if opts.profile:
            flood_top = tenant_isolation(
                opts.flood, True, inflight=opts.flood_inflight, profile=True
            )["profile"]
        row("user B's search p99 alone, worker up (ms)", [r["b_idle_p99"] * 1e3 for r in up], ms)
        row(f"  while user A floods {opts.flood} searches (ms)", [r["b_p99"] * 1e3 for r in up], ms)
        row("  ratio", [r["b_p99"] / r["b_idle_p99"] for r in up], goal="<= 2x")
        row("  B's event stream opens, p99 (ms)", [r["open_p99"] * 1e3 for r in up], ms, "<= 100")
        for r in up:
            rows.append(("  statuses: A's, B's", f"{r['a_codes']}, {r['b_codes']}", ""))
        down = [
            tenant_isolation(opts.flood, False, inflight=opts.flood_inflight)
            for _ in range(opts.rounds)
        ]
        row(
            "no worker: B's slowest search (s)", [r["b_max"] for r in down], goal="~5 (its timeout)"
        )
        row("  A's slowest search (s)", [r["a_max"] for r in down])
        row("  B's event stream opens, p99 (ms)", [r["open_p99"] * 1e3 for r in down], ms, "<= 100")
        for r in down:
            rows.append(("  statuses: A's, B's", f"{r['a_codes']}, {r['b_codes']}", ""))
    if "8" in only:
        for fault, name in (("kill", "PostgreSQL killed 8 s"), ("restart", "fast restart")):
            results = [database_fault(fault) for _ in range(opts.rounds)]
            row(f"{name} under chat load (10 msg/s for 20 s): 5xx but 503",
                [r["five_hundreds"] for r in results], "{:.0f}", "0")  # fmt: skip
            no_retry = [r["refused_without_retry_after"] for r in results]
            row("  503/429 without Retry-After", no_retry, "{:.0f}", "0")
            row("  accepted, stored (each round)",
                "; ".join(f"{r['accepted']}, {r['stored']}" for r in results))  # fmt: skip
            row("  accepted not answered (error or unfinished)",
                [r["errors"] + r["unfinished"] for r in results], "{:.0f}", "0")  # fmt: skip
            row(
                "  finished runs without usage",
                [r["without_usage"] for r in results],
                "{:.0f}",
                "0",
            )
            for r in results:
                rows.append(("  statuses (status: count)", r["codes"], ""))
    print(f"\n{THROTTLES_NOTE}\n")
    print("| measure | min / median / max | goal |")
    print("|---|---|---|")
    for name, value, goal in rows:
        print(f"| {name} | {value} | {goal} |")
    if chats_top:
        print(f"\nWhat the worker computes during {opts.chats} chats at once (a round of its own,")
        print("not in the figures; py-spy, samples of the thread holding the GIL, each for its")
        print("innermost frame of ours, else of the libraries):\n")
        for name, share in chats_top:
            print(f"- {share:.1f}% {name}")
    if web_top:
        print("\nWhere the web process's time goes during a burst (a round of its own, not in")
        print("the figures; py-spy, innermost frame of ours, else of Django/DRF/uvicorn; waits")
        print("left out):\n")
        for name, share in web_top:
            print(f"- {share:.1f}% {name}")
    for name, shares in flood_top.items():
        print(f"\nWhere the {name} process's time goes during A's flood (a round of its own, as")
        print("above):\n")
        for frame, share in shares:
            print(f"- {share:.1f}% {frame}")
    if "5" in only and top:
        print(
            "\nWhere the worker's time goes (a round of its own, not in the figures; py-spy, share"
            "\nof the busy samples, innermost frame):\n"
        )
        for name, share in top:
            print(f"- {share:.1f}% {name}")


if __name__ == "__main__":
    main()
