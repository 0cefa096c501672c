"""Flow control on the AgentBus, end to end: weights, caps, shared endpoint limits, lanes,
and what the rules cost per task.

    bin/with-redis --ephemeral -- .venv/bin/python bench/fairness.py \
        [--rounds 3] [--only weights,cap,limit,lanes,cost,take,paired] [--no-base]
        [--take-tasks N] [--cost-tasks N]

Real Redis (REDIS_URL; the bench FLUSHES that database, so give it one of its own), real
worker processes started as the Procfile's `worker` line starts them (threads pool, its
concurrency, `-Q uws.maintenance`, `--loglevel=INFO`), the settings' defaults except
those named here, and the local OpenAI-compatible test server (tests/runtime/
openai_server.py) with a rate limit of its own. Each goal is paired, in the same round,
with a baseline, and min / median / max over the rounds are printed beside the load
average. Settings the bench changes (printed in its header too): LOG_LEVEL=WARNING,
AGENTBUS_SLOT_LEASE_SECONDS=30 (the default), LLM_MAX_RETRIES=0 for the limit goal.

1. weights: two projects with weights 3 and 1 each get a backlog of 1,500 tasks (20 ms
   each) at once; when 1,200 have ended, the ratio of the two projects' ended tasks.
   Baseline: both weight 1 (expected 1:1).
2. cap: a project with max_in_flight 5 gets 100 tasks (50 ms each) served by two worker
   processes; the most of its tasks running at once (counted inside the tasks) and the
   time to drain. Baseline: no cap.
3. limit: 20 projects × 4 runs, each one chat completion against an endpoint limited to
   60 requests/min (the server answers 429 with Retry-After past that); the bus's shared
   limit is FLOW_LIMITS {"*": {"rpm": 60}}. Runs failed, 429s the endpoint answered,
   the most requests it served in one minute. Baseline: no shared limit (only the
   endpoint's 429 and its Retry-After).
4. lanes: a project's chat run (stream from the test server, 5 tokens, its first after
   FIRST_TOKEN_SECONDS = 0.3 s, a hosted model's time to first token) while 1,000 bulk
   tasks (50 ms each, the ingest stand-in) of the same project are queued and running;
   seconds from publish to the first delta, against the same chat with nothing queued
   (idle), and the time it added.
   Baseline: the same 1,000 tasks on the interactive lane (no lanes).
5. cost: 5,000 no-op tasks (`--cost-tasks`) spread over 1,000 active projects, one
   worker; tasks/s, the Redis server's CPU per task (INFO cpu of the bench's own server,
   publish + take + run + ack) and that plus the worker process's CPU (/proc, all its
   threads; the publishing bench process left out) in five modes:
   - `off`, **the baseline**: this tree with AGENTBUS_FLOW_CONTROL=false, so the only
     difference to the other modes of this tree is the rules: the plain round-robin
     take (TAKE_PLAIN: no rules read, no slot, no counter, no lane turn) and no renew
     and served-count beat in the worker. Everything else (trace headers, no-op spans,
     task metrics, the message's size) is the same code in both;
   - `none` (no rules set), `weights` (every project weight 2, no cap), `capped`
     (weight 2, cap 1,000: applied but not binding);
   - `before`: the worker run from `--base-ref` (default 19734fc, the bus before flow
     control, extracted with `git archive`), kept for history: it also lacks what came
     after it besides the rules (tracing's headers and spans, task metrics), so its
     distance to `off` is that code's cost, not the rules'.
   Every mode runs in each round (alternating order), and its costs are paired with
   `off`'s of the same round.
6. take: the broker's side alone (the take script as a shared worker sends it plus the
   acknowledgement, and the slot's release under a cap), `--take-tasks` messages on
   1,000 queues, sent from this process one at a time: wall µs per task and the Redis
   server's CPU µs per task, in the same five modes, paired with `off`.
7. paired: the broker's side again, every mode in one Redis at once, interleaved in
   blocks of 50 takes so each meets the same load (its own projects, ready list and
   unacked keys): the server's CPU, the scripts' own time (commandstats) and Redis
   commands per task. The steadiest of the cost measures on a shared machine.

Not measured here: real ingest (chunking and embedding, bench/chat.py), the web side,
more than one host, a Redis on another host, and rates above what two shared cores give.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if __name__ == "__main__":
    sys.path[:0] = [str(ROOT)]
    from bench.harness import bootstrap

    os.environ.setdefault("DATABASE_URL", f"sqlite:///{ROOT}/var/bench-fairness/db.sqlite3")
    bootstrap("fairness")

from celery import shared_task  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.test import override_settings  # noqa: E402

from agentbus import AgentBusTask, publish, transport  # noqa: E402
from agentbus.keys import ACTIVE_KEY  # noqa: E402
from agentbus.queues import project_queue  # noqa: E402
from common.redis import get_redis  # noqa: E402
from llm.openai_api import OpenAIProvider, openai_client  # noqa: E402
from llm.types import ChatRequest, ProviderError  # noqa: E402
from tests.runtime.openai_server import FakeOpenAI  # noqa: E402
from tests.workers import wait_until  # noqa: E402

try:
    from agentbus.flow import flow_rules_set
except ImportError:  # the tree before flow control, which the `before` worker runs
    flow_rules_set = None

DONE = "bench:flow:done:"  # + project id
ALL_DONE = "bench:flow:done"
LAST = "bench:flow:last"
RUNNING = "bench:flow:running:"
PEAK = "bench:flow:peak:"
FIRST_DELTA = "bench:flow:first-delta"
LLM_OK = "bench:flow:llm-ok"
LLM_FAILED = "bench:flow:llm-failed"
# Why runs of the limit goal failed: (mode, reason) -> count, over all rounds.
FAILURES: collections.Counter = collections.Counter()
# The lanes goal's model: its time to first token (a hosted model's is 0.2-1 s).
FIRST_TOKEN_SECONDS = 0.3

# Raise the peak of a project's running tasks. KEYS: running, peak.
_STARTED = """
local n = redis.call('INCR', KEYS[1])
if n > tonumber(redis.call('GET', KEYS[2]) or '0') then redis.call('SET', KEYS[2], n) end
return n
"""


@shared_task(base=AgentBusTask, bind=True, name="bench.flow_work", ignore_result=True)
def flow_work(self, *, project_id: str, ms: int = 0, of: int = 0) -> None:
    """A task that takes `ms` (sleeping: agent runs wait on I/O) and counts itself."""
    client = get_redis()
    client.eval(_STARTED, 2, RUNNING + project_id, PEAK + project_id)
    try:
        if ms:
            time.sleep(ms / 1000)
    finally:
        pipe = client.pipeline()
        pipe.decr(RUNNING + project_id)
        pipe.incr(DONE + project_id)
        pipe.incr(ALL_DONE)
        total = pipe.execute()[-1]
        if of and total == of:
            client.set(LAST, time.time())


@shared_task(base=AgentBusTask, bind=True, name="bench.flow_chat", ignore_result=True)
def flow_chat(self, *, project_id: str, sent: float) -> None:
    """A chat answer: streams a completion, records publish -> first delta."""

    provider = OpenAIProvider(openai_client())
    request = ChatRequest(model="bench", messages=[{"role": "user", "content": "hi"}])
    for _part in provider.stream(request):
        get_redis().rpush(FIRST_DELTA, time.time() - sent)
        break


@shared_task(base=AgentBusTask, bind=True, name="bench.flow_llm", ignore_result=True)
def flow_llm(self, *, project_id: str) -> None:
    """A run that makes one chat completion within a 120 s deadline."""

    provider = OpenAIProvider(openai_client())
    request = ChatRequest(
        model="bench",
        messages=[{"role": "user", "content": "hi"}],
        deadline=time.monotonic() + 120,
    )
    try:
        "".join(p for p in provider.stream(request) if isinstance(p, str))
    except ProviderError as exc:
        get_redis().rpush(LLM_FAILED, str(exc)[:200])
    else:
        get_redis().incr(LLM_OK)


# --- workers ------------------------------------------------------------------------------


def procfile_worker() -> list[str]:
    """The Procfile's worker line: its arguments after `celery -A config worker`."""

    line = next(x for x in (ROOT / "Procfile").read_text().splitlines() if x.startswith("worker:"))
    line = re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: os.environ.get(m.group(1), m.group(2)), line)
    words = shlex.split(line.split(":", 1)[1])
    return words[words.index("worker") + 1 :]


class Worker:
    """A `celery -A config worker` process as the Procfile starts it; `root`: the source
    tree it runs from (another checkout for the before-flow-control baseline)."""

    def __init__(self, *, env: dict[str, str] | None = None, root: Path = ROOT):
        environ = dict(os.environ, PYTHONPATH=str(root), REMAP_SIGTERM="SIGQUIT")
        environ.update(env or {})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "config", "worker", "-I", "bench.fairness",
             "-n", f"flow-{uuid.uuid4().hex[:6]}@%h", *procfile_worker()],
            cwd=root, env=environ, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)


@contextlib.contextmanager
def workers(count: int = 1, warm: bool = True, **kwargs):
    started = [Worker(**kwargs) for _ in range(count)]
    if not warm:  # the caller waits for what the workers do
        try:
            yield started
        finally:
            for worker in started:
                worker.stop()
        return
    try:
        # Each is up once it ran a task of a project of its own (both poll the list).
        warm = uuid.uuid4()
        for _ in range(count * 20):
            publish(flow_work, project_id=warm, kwargs={})
        wait_until(lambda: int(get_redis().get(DONE + str(warm)) or 0) >= count * 20, 120, "up")
        time.sleep(0.5 if count > 1 else 0)  # let a second worker finish starting too
        get_redis().delete(ALL_DONE, LAST)
        yield started
    finally:
        for worker in started:
            worker.stop()


def fresh() -> None:
    get_redis().flushdb()


def done(project) -> int:
    return int(get_redis().get(DONE + str(project)) or 0)


# --- the goals --------------------------------------------------------------------------------


def weights(weighted: bool) -> float:
    fresh()
    heavy, light = uuid.uuid4(), uuid.uuid4()
    flow_rules_set(project_id=heavy, weight=3 if weighted else 1, max_in_flight=0)
    # Both backlogs first (saturating: the publisher is slower than the pool), then the
    # worker.
    for _ in range(1500):
        publish(flow_work, project_id=heavy, kwargs={"ms": 20})
        publish(flow_work, project_id=light, kwargs={"ms": 20})
    with workers(warm=False):
        wait_until(lambda: int(get_redis().get(ALL_DONE) or 0) >= 1200, 600, "1,200 ended")
        return done(heavy) / max(1, done(light))


def cap(capped: bool) -> tuple[int, float]:
    fresh()
    project = uuid.uuid4()
    flow_rules_set(project_id=project, weight=1, max_in_flight=5 if capped else 0)
    with workers(2):
        started = time.monotonic()
        for _ in range(100):
            publish(flow_work, project_id=project, kwargs={"ms": 50, "of": 100})
        wait_until(lambda: get_redis().get(LAST), 600, "100 ended", interval=0.005)
        elapsed = time.monotonic() - started
        return int(get_redis().get(PEAK + str(project)) or 0), elapsed


def limit(shared: bool) -> tuple[int, int, int, float]:
    fresh()
    server = FakeOpenAI().start()
    server.rate_limit, server.rate_window, server.retry_after = 60, 60.0, 1.0
    env = {"OPENAI_BASE_URL": server.base_url, "OPENAI_API_KEY": "bench", "LLM_MAX_RETRIES": "0"}
    env["FLOW_LIMITS"] = json.dumps({"*": {"rpm": 60}} if shared else {})
    projects = [uuid.uuid4() for _ in range(20)]
    try:
        with workers(env=env):
            server.requests.clear()
            server.served_at, server.peak_in_window, server.rejected = [], 0, 0
            started = time.monotonic()
            for _ in range(4):
                for project in projects:
                    publish(flow_llm, project_id=project, kwargs={})
            client = get_redis()
            wait_until(
                lambda: int(client.get(LLM_OK) or 0) + client.llen(LLM_FAILED) >= 80, 400, "runs"
            )
            for reason in client.lrange(LLM_FAILED, 0, -1):
                FAILURES[("shared limit" if shared else "no limit", reason)] += 1
            return (
                client.llen(LLM_FAILED),
                server.rejected,
                server.peak_in_window,
                time.monotonic() - started,
            )
    finally:
        server.stop()


def lanes(backlog: int, lane: str) -> float:
    fresh()
    server = FakeOpenAI().start()
    server.first_token_delay = FIRST_TOKEN_SECONDS
    env = {"OPENAI_BASE_URL": server.base_url, "OPENAI_API_KEY": "bench"}
    project = uuid.uuid4()
    try:
        with workers(env=env):
            # The worker's LLM client made (its first call), as it is in a worker at work.
            publish(flow_chat, project_id=uuid.uuid4(), kwargs={"sent": time.time()})
            wait_until(lambda: get_redis().lpop(FIRST_DELTA), 120, "a first chat")
            for _ in range(backlog):
                publish(flow_work, project_id=project, kwargs={"ms": 50}, lane=lane)
            if backlog:
                # The pool is busy with the backlog: the chat arrives in the middle of it.
                wait_until(lambda: done(project) >= 50, 120, "the backlog running")
            publish(flow_chat, project_id=project, kwargs={"sent": time.time()})
            first = wait_until(lambda: get_redis().lpop(FIRST_DELTA), 300, "the first delta")
            return float(first)
    finally:
        server.stop()


# The rules each cost mode gives every one of the 1,000 projects: (weight, max in flight).
# `none`: no rules (the take's defaults); `off`: this tree with flow control off
# (AGENTBUS_FLOW_CONTROL=false: the plain take, no renew beat), the bus without the
# rules and the baseline the others are paired with; `before`: the worker of
# `--base-ref`.
COST_RULES = {"none": None, "weights": (2, 0), "capped": (2, 1000)}
COST_MODES = ("before", "off", "none", "weights", "capped")


def server_cpu() -> float:
    """Seconds of CPU the Redis server used so far (user + system): the bench's own
    server, which nothing else talks to."""
    info = get_redis().info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def rules_for(projects, mode: str) -> None:
    rules = COST_RULES.get(mode)
    if rules:
        for project in projects:
            flow_rules_set(project_id=project, weight=rules[0], max_in_flight=rules[1])


def process_cpu(pid: int) -> float:
    """Seconds of CPU a process used so far (user + system, all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cost(mode: str, base_root: Path | None, total: int = 5000) -> tuple[float, float, float]:
    """Tasks/s end to end and the Redis server's CPU µs per task (publish, take, run,
    ack), one worker, 5,000 no-op tasks over 1,000 active projects, under COST_RULES[mode]
    (`before`: the worker from the branch's base)."""

    fresh()
    projects = [uuid.uuid4() for _ in range(1000)]
    get_redis().zadd(ACTIVE_KEY, {project_queue(p): time.time() for p in projects})
    rules_for(projects, mode)
    root = base_root if mode == "before" else ROOT
    env = {"AGENTBUS_FLOW_CONTROL": "false" if mode == "off" else "true"}
    with workers(root=root, env=env) as started:
        pid = started[0].proc.pid
        cpu, worker_cpu = server_cpu(), process_cpu(pid)
        first = time.time()
        for i in range(total):
            publish(flow_work, project_id=projects[i % len(projects)], kwargs={"of": total})
        last = float(wait_until(lambda: get_redis().get(LAST), 600, "the run"))
        redis_us = (server_cpu() - cpu) / total * 1e6
        worker_us = (process_cpu(pid) - worker_cpu) / total * 1e6
        return total / (last - first), redis_us, worker_us + redis_us


def take_setup(mode: str, base_root: Path | None, unacked: str, index: str) -> tuple:
    """The take script a shared worker of `mode` sends, its keys (ready list, members,
    bell, the unacked keys given, ...; no queue of its own) and its arguments: `before`
    the take of `--base-ref`, `off` this tree's with flow control off, else this tree's."""
    if mode != "before":
        with override_settings(AGENTBUS_FLOW_CONTROL=mode != "off"):
            return transport.take_call(unacked, index)
    source = (base_root / "agentbus" / "transport.py").read_text()
    script = re.search(r'\nTAKE = """(.*?)"""', source, re.S).group(1)
    keys = [transport.READY_KEY, transport.READY_MEMBERS_KEY, transport.READY_BELL_KEY]
    args = [transport.TOMBSTONE_PREFIX, transport.PROJECT_QUEUE_PREFIX, "64"]
    return script, [*keys, unacked, index], args


def take_cost(mode: str, base_root: Path | None, tasks: int = 5000) -> tuple[float, float]:
    """Microseconds per task of the broker's side of delivery, measured from this
    process (wall time) and as the Redis server's CPU: the take script (as a shared
    worker sends it) plus the acknowledgement (kombu's two removals, and the slot's
    release under a cap), over `tasks` messages spread on 1,000 active queues.
    `before`: the take of `--base-ref`; else this branch's take under COST_RULES[mode]."""
    fresh()
    client = get_redis()
    projects = [uuid.uuid4() for _ in range(1000)]
    rules_for(projects, mode)
    for i in range(tasks):
        publish(flow_work, project_id=projects[i % len(projects)], kwargs={})
    script, keys, args = take_setup(mode, base_root, "unacked", "unacked_index")
    sha = client.script_load(script)
    release = client.script_load(transport.RELEASE)
    cpu = server_cpu()
    started = time.perf_counter()
    for _ in range(tasks):
        reply = client.evalsha(sha, len(keys), *keys, *args)
        tag = json.loads(reply[1])["properties"]["delivery_tag"]
        pipe = client.pipeline()
        pipe.zrem("unacked_index", tag).hdel("unacked", tag)
        if len(reply) > 4 and int(reply[4]):
            rkeys = transport.release_keys(reply[0])
            pipe.evalsha(release, len(rkeys), *rkeys, tag, reply[0])
        pipe.execute()
    wall = (time.perf_counter() - started) / tasks * 1e6
    return wall, (server_cpu() - cpu) / tasks * 1e6


def take_paired(base_root: Path | None, tasks: int, block: int = 50) -> dict[str, tuple]:
    """The broker's side per task, all modes in ONE Redis at once, in interleaved blocks
    of `block` takes (mode A's block, then B's, ...), so every mode meets the same load:
    each mode gets its own 1,000 projects and its own ready list, bell and unacked keys
    (renamed after its messages were published), the take script of its code, and the
    acknowledgement as a worker sends it (ZREM + HDEL, plus the slot's release under a
    cap; no MULTI). Per mode: the Redis server's CPU µs per task (INFO cpu around each
    block: parsing, networking and scripts), the scripts' own µs per task
    (commandstats: EVALSHA, which includes the commands a script calls), and Redis
    commands per task (commandstats calls, a script's inner calls included)."""
    fresh()
    client = get_redis()
    modes = [m for m in COST_MODES if base_root or m != "before"]
    setup = {}
    for mode in modes:
        projects = [uuid.uuid4() for _ in range(1000)]
        rules_for(projects, mode)
        for i in range(tasks):
            publish(flow_work, project_id=projects[i % len(projects)], kwargs={})
        names = [f"bench:{mode}:ready", f"bench:{mode}:members", f"bench:{mode}:bell"]
        for key, name in zip(
            [transport.READY_KEY, transport.READY_MEMBERS_KEY, transport.READY_BELL_KEY],
            names,
            strict=True,
        ):
            if client.exists(key):
                client.rename(key, name)
        script, keys, args = take_setup(
            mode, base_root, f"bench:{mode}:unacked", f"bench:{mode}:unacked_index"
        )
        keys[:3] = names
        setup[mode] = (client.script_load(script), keys, args)
    release = client.script_load(transport.RELEASE)
    totals = {m: [0.0, 0.0, 0] for m in modes}  # cpu s, script µs, commands

    def stats() -> tuple[float, float, int]:
        info = client.info("commandstats")
        calls = sum(v["calls"] for k, v in info.items() if not k.startswith("cmdstat_info"))
        return server_cpu(), float(info.get("cmdstat_evalsha", {}).get("usec", 0)), calls

    for start in range(0, tasks, block):
        order = modes if (start // block) % 2 == 0 else list(reversed(modes))
        for mode in order:
            sha, keys, args = setup[mode]
            unacked, index = keys[3], keys[4]
            before = stats()
            for _ in range(min(block, tasks - start)):
                reply = client.evalsha(sha, len(keys), *keys, *args)
                tag = json.loads(reply[1])["properties"]["delivery_tag"]
                pipe = client.pipeline(transaction=False)
                pipe.zrem(index, tag).hdel(unacked, tag)
                if len(reply) > 4 and int(reply[4]):
                    rkeys = transport.release_keys(reply[0])
                    pipe.evalsha(release, len(rkeys), *rkeys, tag, reply[0])
                pipe.execute()
            after = stats()
            totals[mode][0] += after[0] - before[0]
            totals[mode][1] += after[1] - before[1]
            totals[mode][2] += after[2] - before[2]  # INFO left out
    return {m: (t[0] / tasks * 1e6, t[1] / tasks, t[2] / tasks) for m, t in totals.items()}


def base_tree(ref: str) -> Path:
    """The source at `ref`, with this bench file in it (the worker imports it)."""
    target = ROOT / "var" / "bench" / f"base-{ref[:12]}"
    if not target.exists():
        target.mkdir(parents=True)
        archive = subprocess.run(["git", "archive", ref], cwd=ROOT, check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True)
    shutil.copy(__file__, target / "bench" / "fairness.py")
    return target


# --- report -----------------------------------------------------------------------------------


def spread(values, fmt="{:.2f}") -> str:
    return " / ".join(fmt.format(v) for v in (min(values), statistics.median(values), max(values)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", default="weights,cap,limit,lanes,cost,take")
    parser.add_argument("--base-ref", default="19734fc", help="the bus before flow control")
    parser.add_argument("--no-base", action="store_true", help="cost: skip the base worker")
    parser.add_argument("--take-tasks", type=int, default=5000, help="tasks per take run")
    parser.add_argument("--cost-tasks", type=int, default=5000, help="tasks per cost run")
    opts = parser.parse_args()
    goals = opts.only.split(",")

    call_command("migrate", verbosity=0)
    wants_base = bool({"cost", "take", "paired"} & set(goals)) and not opts.no_base
    base_root = base_tree(opts.base_ref) if wants_base else None
    print(
        f"Flow control end to end: Redis {os.environ['REDIS_URL']}; worker: "
        f"{' '.join(procfile_worker())}; LOG_LEVEL={os.environ['LOG_LEVEL']}; "
        f"{opts.rounds} rounds, each goal paired with its baseline in the same round"
    )
    rows: dict[str, list] = {g: [] for g in goals}
    for round_ in range(opts.rounds):
        if "weights" in goals:
            rows["weights"].append((weights(True), weights(False), os.getloadavg()[0]))
        if "cap" in goals:
            rows["cap"].append((cap(True), cap(False), os.getloadavg()[0]))
        if "limit" in goals:
            rows["limit"].append((limit(True), limit(False), os.getloadavg()[0]))
        if "lanes" in goals:
            idle = lanes(0, "interactive")
            rows["lanes"].append(
                (idle, lanes(1000, "bulk"), lanes(1000, "interactive"), os.getloadavg()[0])
            )
        if "cost" in goals or "take" in goals or "paired" in goals:
            # Alternating order, so neither side always runs on a warmer server.
            order = list(COST_MODES) if round_ % 2 == 0 else list(reversed(COST_MODES))
            order = [m for m in order if base_root or m != "before"]
            if "paired" in goals:
                rows["paired"].append((take_paired(base_root, opts.take_tasks), os.getloadavg()[0]))
            for goal, measure in (("cost", cost), ("take", take_cost)):
                if goal in goals:
                    if goal == "cost":
                        figures = {m: measure(m, base_root, opts.cost_tasks) for m in order}
                    else:
                        figures = {m: measure(m, base_root, opts.take_tasks) for m in order}
                    rows[goal].append((figures, os.getloadavg()[0]))
        print(f"  round {round_ + 1} done, load {os.getloadavg()[0]:.2f}", flush=True)

    print("\n| goal | measure | with flow control | baseline | goal met | load (1 min) |")
    print("|---|---|---|---|---|---|")
    if rows.get("weights"):
        ratios = [r[0] for r in rows["weights"]]
        base = [r[1] for r in rows["weights"]]
        met = all(2.7 <= r <= 3.3 for r in ratios)
        print(
            f"| weights 3:1 | served ratio (min/med/max) | {spread(ratios)} | "
            f"{spread(base)} (1:1) | {'yes' if met else 'NO'} (3 ± 10 %) | "
            f"{spread([r[2] for r in rows['weights']])} |"
        )
    if rows.get("cap"):
        peaks = [r[0][0] for r in rows["cap"]]
        base = [r[1][0] for r in rows["cap"]]
        times = [r[0][1] for r in rows["cap"]]
        base_times = [r[1][1] for r in rows["cap"]]
        print(
            f"| cap K=5, 100 tasks, 2 workers | most running at once | {spread(peaks, '{:.0f}')} "
            f"| {spread(base, '{:.0f}')} (no cap) | {'yes' if max(peaks) <= 5 else 'NO'} (≤ 5) "
            f"| {spread([r[2] for r in rows['cap']])} |"
        )
        print(
            f"| | seconds to drain | {spread(times)} | {spread(base_times)} | (5 × 50 ms "
            f"at a time: ≥ 1.0 s) | |"
        )
    if rows.get("limit"):
        ours = [r[0] for r in rows["limit"]]
        base = [r[1] for r in rows["limit"]]
        loads = spread([r[2] for r in rows["limit"]])
        print(
            "| 20 projects, endpoint 60/min | runs failed | "
            f"{spread([o[0] for o in ours], '{:.0f}')} "
            f"| {spread([b[0] for b in base], '{:.0f}')} | "
            f"{'yes' if max(o[0] for o in ours) == 0 else 'NO'} (0) | {loads} |"
        )
        print(
            f"| | 429s answered | {spread([o[1] for o in ours], '{:.0f}')} | "
            f"{spread([b[1] for b in base], '{:.0f}')} | "
            f"{'yes' if max(o[1] for o in ours) == 0 else 'NO'} (0) | |"
        )
        print(
            f"| | most served in one minute | {spread([o[2] for o in ours], '{:.0f}')} | "
            f"{spread([b[2] for b in base], '{:.0f}')} | "
            f"{'yes' if max(o[2] for o in ours) <= 60 else 'NO'} (≤ 60) | |"
        )
        for (mode, reason), count in sorted(FAILURES.items()):
            print(f"|   | failed ({mode}): {reason} | {count} | | | |")
        print(
            f"| | seconds for the 80 runs | {spread([o[3] for o in ours], '{:.1f}')} | "
            f"{spread([b[3] for b in base], '{:.1f}')} | | |"
        )
    if rows.get("lanes"):
        idle = [r[0] for r in rows["lanes"]]
        bulk = [r[1] for r in rows["lanes"]]
        flat = [r[2] for r in rows["lanes"]]
        ratio = [b / i for b, i in zip(bulk, idle, strict=True)]
        added = [(b - i) * 1000 for b, i in zip(bulk, idle, strict=True)]
        print(
            f"| chat during 1,000 bulk tasks | first delta, s (idle: {spread(idle, '{:.3f}')}) "
            f"| {spread(bulk, '{:.3f}')} ({spread(ratio, '{:.2f}')}× idle, "
            f"+{spread(added, '{:.0f}')} ms) | "
            f"{spread(flat, '{:.3f}')} (no lanes) | {'yes' if max(ratio) <= 2 else 'NO'} "
            f"(≤ 2× idle) | {spread([r[3] for r in rows['lanes']])} |"
        )
    if rows.get("paired"):
        loads = spread([r[1] for r in rows["paired"]])
        modes = list(rows["paired"][0][0])
        base = "off"
        print(
            f"\nbroker side, all modes interleaved in one Redis, {opts.take_tasks:,} tasks each "
            f"(load {loads}); extra: paired within each round, against `{base}`"
        )
        print(
            "\n| mode | Redis CPU µs/task | scripts µs/task | commands/task | extra CPU "
            "| extra scripts |"
        )
        print("|---|---|---|---|---|---|")
        for mode in modes:
            cpu = [r[0][mode][0] for r in rows["paired"]]
            script = [r[0][mode][1] for r in rows["paired"]]
            calls = [r[0][mode][2] for r in rows["paired"]]
            xcpu = [r[0][mode][0] / r[0][base][0] - 1 for r in rows["paired"]]
            xscript = [r[0][mode][1] / r[0][base][1] - 1 for r in rows["paired"]]
            print(
                f"| {mode} | {spread(cpu, '{:.1f}')} | {spread(script, '{:.1f}')} | "
                f"{spread(calls, '{:.1f}')} | {spread(xcpu, '{:+.1%}')} | "
                f"{spread(xscript, '{:+.1%}')} |"
            )
    for goal, title, unit in (
        ("cost", f"end to end, {opts.cost_tasks:,} no-op tasks, 1,000 active, 1 worker",
         ("tasks/s", "{:.0f}")),
        ("take", f"broker side (take + ack), {opts.take_tasks:,} tasks, 1,000 queues",
         ("wall µs/task", "{:.0f}")),
    ):  # fmt: skip
        if not rows.get(goal):
            continue
        loads = spread([r[1] for r in rows[goal]])
        modes = [m for m in COST_MODES if m in rows[goal][0][0]]
        base = "off"
        print(f"\n{title} (load {loads}); ratios paired within each round, against `{base}`")
        both = goal == "cost"  # the worker's CPU too (its process, all threads)
        print(
            "\n| mode | "
            + unit[0]
            + " | Redis CPU µs/task | extra wall | extra Redis CPU |"
            + (" worker + Redis CPU µs/task | extra worker + Redis CPU |" if both else "")
        )
        print("|---|---|---|---|---|" + ("---|---|" if both else ""))
        for mode in modes:
            values = [r[0][mode][0] for r in rows[goal]]
            cpus = [r[0][mode][1] for r in rows[goal]]
            if goal == "cost":  # tasks/s: the cost is the rate lost
                extra = [r[0][base][0] / r[0][mode][0] - 1 for r in rows[goal]]
            else:
                extra = [r[0][mode][0] / r[0][base][0] - 1 for r in rows[goal]]
            extra_cpu = [r[0][mode][1] / r[0][base][1] - 1 for r in rows[goal]]
            line = (
                f"| {mode} | {spread(values, unit[1])} | {spread(cpus, '{:.1f}')} | "
                f"{spread(extra, '{:+.1%}')} | {spread(extra_cpu, '{:+.1%}')} |"
            )
            if both:
                total = [r[0][mode][2] for r in rows[goal]]
                extra_total = [r[0][mode][2] / r[0][base][2] - 1 for r in rows[goal]]
                line += f" {spread(total, '{:.0f}')} | {spread(extra_total, '{:+.1%}')} |"
            print(line)


if __name__ == "__main__":
    main()
