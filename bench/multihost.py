"""Chat throughput across hosts: two worker hosts against one (or two web hosts against
one), end to end.

    .venv/bin/python bench/multihost.py [--rounds 3] [--messages 600] [--projects 1000]
        [--latency 0.4] [--concurrency 100] [--clients 16] [--vary workers|webs]

Needs root (network namespaces), iproute2, PostgreSQL's binaries and the bundled Valkey
(tests.multihost.stack says which is missing). The stack is tests.multihost.stack's:
a services host (PostgreSQL, Redis, the test LLM server, beat), web1 and web2 (the
Procfile's `web`), worker1 and worker2 (its `worker` and `maintenance`), each a network
namespace, every request over the bed's bridge.

Each round measures, paired and in alternating order, the same traffic with worker2
stopped (one worker host) and running (two): --messages chat messages over --projects
projects (all of them active on the bus: marked so in Redis, as their earlier use
would), the project of each message drawn from a Zipf law (the k-th gets a share
proportional to 1/k^1.1), its session one of the project's (enough sessions that
answers of one session rarely queue behind each other). --clients threads post as fast
as answers come back, half to web1, half to web2. Throughput: messages answered per
second, from the first post to the last answer's end. Every accepted message must be
answered (done), or the round fails. `--vary webs`: both worker hosts run throughout,
and the clients post to web1 alone, then to web1 and web2 (paired the same way).

The ceiling: every host shares this machine's cores (`os.cpu_count()`, other users'
load included), so two worker hosts cannot do twice the work of one when the whole
stack already uses the cores. Each run reports the CPU the stack used (every process
in the bed's namespaces, from /proc) per answer; `ceiling` is how many times the
one-host rate the machine's cores could carry at that CPU per answer, at most 2, were
the machine otherwise idle. Compare the ratio with the ceiling, and both with the load
average: other users' processes take their share of the same cores. `posted` is how
fast the clients got their messages accepted: when answers come as fast as that, the
web side, not the workers, bounds the run, and a second worker host cannot help.
Where the workers bound it depends on --concurrency and --latency: with the Procfile's
100 threads a worker host runs out of CPU before slots; with few slots and a slow
model (e.g. --concurrency 4 --latency 1) it runs out of slots, as hosts with a small
WORKER_CONCURRENCY would.

Settings changed: the API's throttles raised (tests.multihost.stack), the LLM answers
5 tokens over --latency seconds, each worker host's embedded vector store on its own
disk (no context is stored: agents answer from the conversation). Left out: TLS, a
proxy in front of the web hosts, the client's own CPU (it runs outside the bed, on the
same cores), network latency (the bridge adds none).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if __name__ == "__main__":
    sys.path[:0] = [str(ROOT)]

import httpx  # noqa: E402

from tests.multihost.stack import Stack, unavailable, wait  # noqa: E402

CLOCK = os.sysconf("SC_CLK_TCK")


def stack_cpu(stack: Stack) -> float:
    """CPU seconds used so far by every process in the bed's namespaces."""
    total = 0
    for host in stack.bed.hosts:
        listed = subprocess.run(
            ["ip", "netns", "pids", stack.bed.ns(host)], capture_output=True, text=True
        )
        for pid in listed.stdout.split():
            with contextlib.suppress(OSError, IndexError, ValueError):
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])  # utime + stime
    return total / CLOCK


def setup(stack: Stack, projects: int, messages: int, seed: int) -> list[tuple[str, list[str]]]:
    """Projects, an agent and sessions each, written through the ORM (setup, not
    measured); the projects marked active on the bus."""
    os.environ.update(
        DATABASE_URL=stack.postgres.url,
        REDIS_URL=stack.redis_url,
        CELERY_BROKER_URL=stack.redis_url,
        DJANGO_SETTINGS_MODULE=stack.settings_module,
    )
    # Django and the apps load only now: the stack's database and Redis are known here
    import django

    django.setup()
    from rest_framework.authtoken.models import Token

    from agentbus.keys import ACTIVE_KEY
    from agentbus.queues import project_queue
    from agents.models import Agent
    from chat.models import ChatSession
    from projects.models import Project

    user = Token.objects.get(key=stack.token).user
    shares = zipf_shares(projects)
    made = []
    for k in range(projects):
        project = Project.objects.create(owner=user, name=f"bench {k}")
        agent = Agent.objects.create(project=project, name="a", model="bench-model")
        count = max(1, math.ceil(shares[k] * messages / 2))
        sessions = ChatSession.objects.bulk_create(
            ChatSession(project=project, agent=agent) for _ in range(count)
        )
        made.append((str(project.id), [str(s.id) for s in sessions]))
    stack.redis().zadd(ACTIVE_KEY, {project_queue(pid): time.time() for pid, _ in made})
    return made


def zipf_shares(n: int) -> list[float]:
    weights = [1 / (k**1.1) for k in range(1, n + 1)]
    total = sum(weights)
    return [w / total for w in weights]


def traffic(made, messages: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    picks = rng.choices(range(len(made)), weights=zipf_shares(len(made)), k=messages)
    turn = {k: itertools.count() for k in set(picks)}
    return [(made[k][0], made[k][1][next(turn[k]) % len(made[k][1])]) for k in picks]


def answered(stack: Stack, ids: list[int]) -> tuple[int, int, float | None]:
    rows = stack.sql(
        "select m.status, extract(epoch from r.finished_at) from agents_message m "
        "join agents_run r on r.message_id = m.id where m.id = any(%s)",
        (ids,),
    )
    done = sum(1 for status, _ in rows if status == "done")
    failed = sum(1 for status, _ in rows if status in ("error", "cancelled"))
    last = max((float(t) for _, t in rows if t is not None), default=None)
    return done, failed, last


def measure(
    stack: Stack, sends: list[tuple[str, str]], clients: int, webs: tuple[str, ...]
) -> dict:
    """Post every message (clients threads over `webs`), wait for every answer."""
    accepted: list[int] = []
    refused: list[str] = []
    lock = threading.Lock()
    work = iter(enumerate(sends))

    def client(index: int) -> None:
        with stack.client(webs[index % len(webs)]) as http:
            while True:
                with lock:
                    item = next(work, None)
                if item is None:
                    return
                _, (pid, sid) = item
                try:
                    response = http.post(
                        f"/my/projects/{pid}/chat/{sid}/messages/", json={"content": "hi?"}
                    )
                except httpx.HTTPError as exc:
                    refused.append(type(exc).__name__)
                    continue
                with lock:
                    if response.status_code == 202:
                        accepted.append(response.json()["assistant_message_id"])
                    else:
                        refused.append(str(response.status_code))

    cpu0 = stack_cpu(stack)
    began = time.time()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    posted = time.time() - began

    def finished():
        done, failed, last = answered(stack, accepted)
        return (done, failed, last) if done + failed == len(accepted) else None

    done, failed, last = wait(finished, 600, "every answer", 0.5)
    cpu = stack_cpu(stack) - cpu0
    if failed or refused:
        raise SystemExit(f"{failed} answers failed, {len(refused)} posts refused: {refused[:5]}")
    elapsed = last - began
    return {
        "rate": done / elapsed,
        "post_rate": len(sends) / posted,
        "cpu_per_answer": cpu / done,
        "cores_used": cpu / elapsed,
        "done": done,
    }


def spread(values, fmt="{:.2f}") -> str:
    return " / ".join(fmt.format(v) for v in (min(values), statistics.median(values), max(values)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--messages", type=int, default=600)
    parser.add_argument("--projects", type=int, default=1000)
    parser.add_argument("--latency", type=float, default=0.4, help="seconds per answer")
    parser.add_argument("--concurrency", type=int, default=100, help="WORKER_CONCURRENCY")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument(
        "--vary",
        choices=["workers", "webs"],
        default="workers",
        help="what is one host against two: worker hosts (clients on both web hosts), or "
        "web hosts (clients on web1 only against both; two worker hosts)",
    )
    opts = parser.parse_args()
    reason = unavailable()
    if reason:
        raise SystemExit(reason)
    cores = os.cpu_count() or 1
    folder = Path(tempfile.mkdtemp(prefix="bench-multihost-"))
    env = {"WORKER_CONCURRENCY": str(opts.concurrency), "LOG_LEVEL": "WARNING"}
    began = time.monotonic()
    workers = ("worker1",) if opts.vary == "workers" else ("worker1", "worker2")
    with Stack(folder, workers=workers, settings_module="config.settings.test", env=env) as s:
        s.llm(delay=opts.latency / 4, tokens=5)
        made = setup(s, opts.projects, opts.messages, seed=0)
        print(
            f"chat across hosts: {opts.projects:,} active projects, {opts.messages} messages a "
            f"run (Zipf 1.1), {opts.clients} clients, one against two {opts.vary} hosts, "
            f"WORKER_CONCURRENCY="
            f"{opts.concurrency}, LLM {opts.latency:g} s an answer, {cores} cores; logs {folder}",
            flush=True,
        )
        two_running = False
        rows = []
        for round_ in range(opts.rounds):
            results = {}
            order = (1, 2) if round_ % 2 == 0 else (2, 1)
            for hosts in order:
                webs = ("web1", "web2")
                if opts.vary == "webs":
                    webs = webs[:hosts]
                elif hosts == 2 and not two_running:
                    s.workers = ["worker1", "worker2"]
                    s.start_worker("worker2")
                    s.wait_ready()
                    two_running = True
                elif hosts == 1 and two_running:
                    s.kill_host("worker2")
                    s.workers = ["worker1"]
                    two_running = False
                sends = traffic(made, opts.messages, seed=round_)
                results[hosts] = measure(s, sends, opts.clients, webs)
            load = os.getloadavg()[0]
            one, two = results[1], results[2]
            ceiling = min(2.0, cores / one["cpu_per_answer"] / one["rate"])
            rows.append((two["rate"] / one["rate"], ceiling, one, two, load))
            cpu1, cpu2 = one["cpu_per_answer"] * 1e3, two["cpu_per_answer"] * 1e3
            print(
                f"  round {round_ + 1}: 1 host {one['rate']:.1f}/s ({cpu1:.0f} ms CPU/answer, "
                f"stack on {one['cores_used']:.2f} cores, posted {one['post_rate']:.1f}/s), "
                f"2 hosts {two['rate']:.1f}/s ({cpu2:.0f} ms CPU/answer, stack on "
                f"{two['cores_used']:.2f} cores, posted {two['post_rate']:.1f}/s): "
                f"{two['rate'] / one['rate']:.2f}x, ceiling {ceiling:.2f}x; load {load:.1f}",
                flush=True,
            )
    print()
    print("| measure | min / median / max | goal |")
    print("|---|---|---|")
    kind = opts.vary[:-1]
    goal = ">= 1.7x" if opts.vary == "workers" else ""
    print(f"| answers/s, one {kind} host | {spread([r[2]['rate'] for r in rows], '{:.1f}')} | |")
    print(f"| answers/s, two {kind} hosts | {spread([r[3]['rate'] for r in rows], '{:.1f}')} | |")
    print(f"| two hosts / one (paired per round) | {spread([r[0] for r in rows])} | {goal} |")
    print(f"| ceiling on {cores} cores (see docstring) | {spread([r[1] for r in rows])} | |")
    cpu1 = [r[2]["cpu_per_answer"] * 1e3 for r in rows]
    print(f"| stack CPU per answer, one host, ms | {spread(cpu1, '{:.0f}')} | |")
    print(f"| load average after each round | {' '.join(f'{r[4]:.1f}' for r in rows)} | |")
    print(f"\n(total {time.monotonic() - began:.0f} s)")


if __name__ == "__main__":
    main()
