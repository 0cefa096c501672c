"""Runs that wait hold no worker slot: measured on a real stack.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/<existing db> \\
    REDIS_URL=redis://127.0.0.1:<private port>/0 \\
    .venv/bin/python bench/suspended_waits.py [--rounds 3]

The stack runs as the Procfile starts it: uvicorn (one process) and one worker process
(the Procfile's pool: `--pool=threads --concurrency=100`), PostgreSQL, Redis (the bench
FLUSHES that database), and a local server speaking the OpenAI streaming protocol
(tests/runtime/openai_server.py). Each measure runs --rounds times; the table gives
min / median / max.

Settings changed: the API's throttles are raised to 1000000/min (unless set); a POST
answered 503 (the web process at capacity, WEB_MAX_CONCURRENT_REQUESTS) is posted again
after a second, as a client would, the times include that; the
agent-call timeout is AGENT_CALL_TIMEOUT_SECONDS=--call-timeout in the baseline of 2.

1. Approval: N runs whose model calls a tool that requires approval (a built-in tool
   with `requires_approval`). Measured once all N wait: the worker's active tasks (its
   own count, `celery inspect active`), the runs still `running`; then the worker
   process is SIGKILLed, a new one started, all N approved over the API at once, and
   the time until every one ended `done`, and on which worker process each ended.
   Baseline in the same round: the same N runs with the same tool not requiring
   approval (posted to answered).
2. Agent calls: N caller runs, each asking a callee agent whose answer takes --latency
   seconds (LLM latency), on one worker process with 100 threads: wall time from the
   first POST to the last caller's answer, the worker's most active tasks seen while
   they ran, and the most callers seen holding a slot while their callee had been
   running for over a second (sampled from `celery inspect active`, about every
   0.1-3 s). Baseline in the same
   round: AGENT_CALLS_SUSPEND=false (the caller's thread waits for its callee, as
   before), with the calls' timeout --call-timeout:
   how many callers got their callee's answer and the wall time. Where a caller's time
   goes (means, from the runs' timestamps): POST -> its callee created (the caller's
   first turn), the callee's queue wait and run, callee's end -> caller's end (resume,
   queue, last turn).

Left out: more than one web or worker process; a real LLM (its latency is all the stub
adds); beat (the recovery pass is not needed by either measure: nothing is lost).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if __name__ == "__main__":
    sys.path[:0] = [str(ROOT)]
    from bench.harness import bootstrap

    bootstrap("waits", capacity=True, offline=True)

from django.core.management import call_command  # noqa: E402
from django.utils import timezone  # noqa: E402

from agents.models import Agent, Tool  # noqa: E402
from bench.concurrency import (  # noqa: E402
    PROCFILE_WORKER,
    Stack,
    post_all,
    project_with_sessions,
    setup_user,
    spread,
)
from chat.models import Message, Run  # noqa: E402
from config.celery_app import app  # noqa: E402
from tests.runtime.openai_server import FakeOpenAI  # noqa: E402
from tests.workers import wait_until  # noqa: E402


def active_runs(name: str) -> list:
    """The run ids of the tasks the worker runs now, by its own account (remote control:
    `celery inspect active`)."""
    replies = app.control.inspect(destination=[name], timeout=3, limit=1).active() or {}
    if name not in replies:
        # A loaded machine: the reply came late. The sample is skipped (counted in
        # MISSED_SAMPLES), not the round.
        MISSED_SAMPLES.append(name)
        return []
    tasks = replies[name]
    if not isinstance(tasks, list):
        raise SystemExit(f"worker {name} answered `inspect active` with {tasks!r}")
    # Each task's kwargs, as the worker shows them (a dict, or its repr).
    return [
        RUN_ID.search(str(task.get("kwargs") if isinstance(task, dict) else task)) for task in tasks
    ]


MISSED_SAMPLES: list[str] = []
RUN_ID = re.compile(r"run_id['\"]?:\s*['\"]([0-9a-f-]{36})")


def active_tasks(name: str) -> int:
    return len(active_runs(name))


def worker_start(stack: Stack, env: dict[str, str] | None = None) -> str:
    """A (new) worker process on the stack, as the Procfile starts it; returns its name."""
    name = f"bench-{uuid.uuid4().hex[:6]}@{os.uname().nodename}"
    stack.env.update(env or {})
    stack.worker = stack._start(
        "worker", "-m", "celery", "-A", "config", "worker", "--loglevel=WARNING",
        "-Q", "uws.maintenance", "-n", name, *PROCFILE_WORKER,
    )  # fmt: skip
    wait_until(lambda: _answers(name), 60, "worker start", interval=0.1)
    return name


def stack_worker_name() -> str:
    """The name of the one worker the Stack started (it names it at random)."""
    replies = wait_until(
        lambda: app.control.inspect(timeout=2).ping() or None, 60, "the worker's ping", interval=0.1
    )
    return next(name for name in replies if name.startswith("bench-"))


def _answers(name: str) -> bool:
    try:
        return name in (app.control.inspect(destination=[name], timeout=1, limit=1).ping() or {})
    except Exception:
        return False


def post_each(url: str, token: str, paths: list[str], body: dict) -> list[int]:
    """POST to every path at once, as clients do: a 503 (at capacity, with Retry-After)
    is posted again after a second; returns the final status codes."""
    codes = dict.fromkeys(paths, 503)
    for _ in range(30):
        left = [p for p, code in codes.items() if code == 503]
        if not left:
            break
        codes.update(zip(left, asyncio.run(post_all(url, token, left, body)), strict=True))
        if 503 in codes.values():
            time.sleep(1)
    return list(codes.values())


def answers_of(sessions) -> list[int]:
    return list(
        Message.objects.filter(session__in=sessions, role="assistant").values_list("id", flat=True)
    )


def statuses(message_ids) -> dict[str, int]:
    out: dict[str, int] = {}
    for status in Run.objects.filter(message_id__in=message_ids).values_list("status", flat=True):
        out[status] = out.get(status, 0) + 1
    return out


# --- 1. approval ----------------------------------------------------------------------------


def approval_round(n: int, *, approval: bool) -> dict:
    fake = FakeOpenAI().start()
    fake.first_turn = {"tool_calls": [("search_context", {"query": "anything"})]}
    env = {"OPENAI_BASE_URL": fake.base_url, "OPENAI_API_KEY": "bench"}
    stack = Stack(worker=PROCFILE_WORKER, env=env)
    try:
        first = stack_worker_name()
        user, token = setup_user("bench-waits")
        project, agent, sessions = project_with_sessions(user, sessions=n, model="bench-model")
        Agent.objects.filter(id=agent.id).update(params={"top_k": 0})
        Tool.objects.create(
            agent=agent, kind="builtin", name="search_context", requires_approval=approval
        )
        paths = [f"/my/projects/{project.id}/chat/{s.id}/messages/" for s in sessions]
        started = time.time()
        codes = post_each(stack.url, token, paths, {"content": "search?"})
        assert set(codes) == {202}, codes
        answers = answers_of(sessions)
        if not approval:
            wait_until(
                lambda: statuses(answers).get("done") == n, 300, "all answered", interval=0.1
            )
            return {"answered_s": time.time() - started}
        wait_until(lambda: statuses(answers).get("waiting") == n, 300, "all waiting", interval=0.1)
        waiting_s = time.time() - started
        active = active_tasks(first)
        running = statuses(answers).get("running", 0)
        old_pid = stack.worker.pid
        os.killpg(stack.worker.pid, signal.SIGKILL)
        stack.worker.wait(30)
        worker_start(stack)
        runs = list(Run.objects.filter(message_id__in=answers).values_list("id", flat=True))
        approve = [f"/my/projects/{project.id}/runs/{run_id}/approve/" for run_id in runs]
        approved_at = time.time()
        codes = post_each(stack.url, token, approve, {})
        assert set(codes) == {202}, codes
        wait_until(
            lambda: statuses(answers).get("done") == n, 300, "all approved runs done", interval=0.1
        )
        resumed_s = time.time() - approved_at
        new_pid = stack.worker.pid  # `python -m celery`: the worker is this process
        assert new_pid != old_pid
        return {
            "waiting_s": waiting_s,
            "active": active,
            "running": running,
            "resumed_s": resumed_s,
            "on_new_process": Run.objects.filter(
                id__in=runs, worker__endswith=f":{new_pid}"
            ).count(),
        }
    finally:
        stack.stop()
        fake.stop()


# --- 2. agent calls -------------------------------------------------------------------------


def calls_round(n: int, latency: float, *, suspend: bool, call_timeout: float) -> dict:
    fake = FakeOpenAI().start()
    fake.first_turn = {"tool_calls": [("ask", {"message": "Your answer?"})]}
    fake.mode, fake.tokens = "slow", [f"w{i} " for i in range(10)]
    fake.delay = latency / len(fake.tokens)
    env = {
        "OPENAI_BASE_URL": fake.base_url,
        "OPENAI_API_KEY": "bench",
        "AGENT_CALLS_SUSPEND": "true" if suspend else "false",
        "AGENT_CALL_TIMEOUT_SECONDS": str(call_timeout),
        "AGENT_CALL_MAX_FANOUT": "8",
    }
    stack = Stack(worker=PROCFILE_WORKER, env=env)
    try:
        name = stack_worker_name()
        user, token = setup_user("bench-calls")
        project, caller, sessions = project_with_sessions(user, sessions=n, model="bench-model")
        Agent.objects.filter(id=caller.id).update(params={"top_k": 0})
        callee = Agent.objects.create(
            project=project, name="callee", model="bench-model", params={"top_k": 0}
        )
        Tool.objects.create(agent=caller, kind="agent", name="ask", target_agent=callee)
        paths = [f"/my/projects/{project.id}/chat/{s.id}/messages/" for s in sessions]
        started = time.time()
        codes = post_each(stack.url, token, paths, {"content": "ask?"})
        assert set(codes) == {202}, codes
        answers = answers_of(sessions)
        most_active = holding = 0

        def finished() -> bool:
            nonlocal most_active, holding
            running = active_runs(name)
            most_active = max(most_active, len(running))
            # Callers in a worker slot while an agent they asked has been answering for
            # over a second: a slot held by a wait (the second leaves out the moment
            # between a callee's start and its caller being stored).
            waiting_in_slot = (
                Run.objects.filter(
                    id__in=[m.group(1) for m in running if m],
                    message_id__in=answers,
                    children__status="running",
                    children__started_at__lt=timezone.now() - timedelta(seconds=1),
                )
                .distinct()
                .count()
            )
            holding = max(holding, waiting_in_slot)
            done = Run.objects.filter(message_id__in=answers, status__in=Run.FINISHED).count()
            return done == n

        wait_until(finished, call_timeout * 3 + 300, "all callers ended", interval=0.1)
        wall = (
            max(
                Run.objects.filter(message_id__in=answers).values_list("finished_at", flat=True)
            ).timestamp()
            - started
        )
        children = Run.objects.filter(parent__message_id__in=answers)
        answered = sum(
            1
            for run in Run.objects.filter(message_id__in=answers)
            if any(s.get("status") == "done" and s.get("child_run_id") for s in run.steps or ())
        )
        return {
            **phases(answers),
            "wall_s": wall,
            "most_active": most_active,
            "holding": holding,
            "answered": answered,
            "children_done": children.filter(status="done").count(),
        }
    finally:
        stack.stop()
        fake.stop()


def _mean(values) -> float:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else 0.0


def phases(answers) -> dict[str, float]:
    """Where a caller's time goes, mean seconds over the callers (from the runs' own
    timestamps): its first turn until its callee was created, the callee's wait on the
    queue and its run, and from the callee's end to the caller's end (the caller's
    resume, its wait on the queue again, its last turn)."""
    rows = []
    for caller in Run.objects.filter(message_id__in=answers, parent__isnull=True):
        child = Run.objects.filter(parent=caller).order_by("created_at").first()
        if child is None or None in (child.started_at, child.finished_at, caller.finished_at):
            continue
        rows.append(
            (
                (child.created_at - caller.created_at).total_seconds(),
                (child.started_at - child.created_at).total_seconds(),
                (child.finished_at - child.started_at).total_seconds(),
                (caller.finished_at - child.finished_at).total_seconds(),
            )
        )
    names = ("to_callee_s", "callee_queue_s", "callee_run_s", "callee_end_to_caller_end_s")
    return {name: _mean([r[i] for r in rows]) for i, name in enumerate(names)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--latency", type=float, default=2.0)
    parser.add_argument("--call-timeout", type=float, default=30.0)
    parser.add_argument("--only", default="1,2")
    args = parser.parse_args()
    call_command("migrate", verbosity=0)
    only = set(args.only.split(","))
    print(f"load average before: {os.getloadavg()}")
    print(f"worker: {' '.join(PROCFILE_WORKER)}; throttles raised; runs={args.runs}")

    if "1" in only:
        subject, baseline = [], []
        for _ in range(args.rounds):
            subject.append(approval_round(args.runs, approval=True))
            baseline.append(approval_round(args.runs, approval=False))
            print(f"  round: {subject[-1]} | baseline {baseline[-1]} | load {os.getloadavg()}")
        print(f"\n1. {args.runs} runs waiting for approval (min / median / max of {args.rounds})")
        print("| measure | value |\n|---|---|")
        print(f"| posted -> all waiting (s) | {spread([r['waiting_s'] for r in subject])} |")
        print(
            "| worker's active tasks while all wait | "
            f"{spread([r['active'] for r in subject], '{:.0f}')} |"
        )
        print(
            "| runs `running` while all wait | "
            f"{spread([r['running'] for r in subject], '{:.0f}')} |"
        )
        print(
            f"| worker killed, new one started; approved -> all done (s) | "
            f"{spread([r['resumed_s'] for r in subject])} |"
        )
        print(
            f"| runs that ended on the new worker process | "
            f"{spread([r['on_new_process'] for r in subject], '{:.0f}')} |"
        )
        print(
            f"| baseline: same runs, no approval, posted -> all done (s) | "
            f"{spread([r['answered_s'] for r in baseline])} |"
        )

    if "2" in only:
        subject, baseline = [], []
        for _ in range(args.rounds):
            subject.append(
                calls_round(args.runs, args.latency, suspend=True, call_timeout=args.call_timeout)
            )
            baseline.append(
                calls_round(args.runs, args.latency, suspend=False, call_timeout=args.call_timeout)
            )
            print(f"  round: {subject[-1]} | baseline {baseline[-1]} | load {os.getloadavg()}")
        print(
            f"\n2. {args.runs} callers each asking a callee ({args.latency:g} s LLM latency), one "
            f"worker process, 100 threads (min / median / max of {args.rounds})"
        )
        print("| | callers stored (AGENT_CALLS_SUSPEND=true) | threads wait (false, baseline) |")
        print("|---|---|---|")
        for key, label, fmt in (
            ("wall_s", "first POST -> last caller ended (s)", "{:.1f}"),
            ("answered", "callers that got their callee's answer", "{:.0f}"),
            ("children_done", "callees done", "{:.0f}"),
            ("most_active", "worker's most active tasks seen", "{:.0f}"),
            ("to_callee_s", "mean: caller's POST -> its callee created (s)", "{:.1f}"),
            ("callee_queue_s", "mean: callee queued -> started (s)", "{:.1f}"),
            ("callee_run_s", "mean: callee started -> ended (s)", "{:.1f}"),
            ("callee_end_to_caller_end_s", "mean: callee ended -> caller ended (s)", "{:.1f}"),
            ("holding", "most callers seen in a slot while their callee ran (>1 s)", "{:.0f}"),
        ):
            print(
                f"| {label} | {spread([r[key] for r in subject], fmt)} | "
                f"{spread([r[key] for r in baseline], fmt)} |"
            )
    print(f"\n`inspect active` samples without a reply in time: {len(MISSED_SAMPLES)}")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
