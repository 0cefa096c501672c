"""Governance overhead per chat message: quota admission and usage accounting.

    bin/with-redis --ephemeral -- .venv/bin/python bench/quota.py [--messages N] [--rounds R]

For each message, in one process, against the Redis at REDIS_URL and the database at
DATABASE_URL (PostgreSQL recommended; SQLite under VAR_DIR otherwise):

- accept: `message_create` (the service behind POST …/messages/: project lock, two
  messages, the run, dispatch after commit) timed with the governance hook (quota
  admission over the project's and the owner's quotas, both set) and without it (the
  hook swapped for a no-op), alternating message by message;
- run: the worker-side hooks a run adds, timed alone: `usage_meter_start`,
  `usage_record` (reported usage: the row and the Redis counters) and `usage_run_ended`
  (the run leaves the in-flight set).

Overhead per message = p50(accept with) - p50(accept without) + p50(run hooks).
Printed per round, then min / median / max over the rounds (goal: <= 1 ms p50).

Left out: HTTP and DRF (the same with or without the hooks), the audit record the API
adds to every mutation, a chat message included (one INSERT, governance.audit), the
provider call and the rest of the run (the hooks do not touch them), a worker consuming
the queued runs (the runs stay queued; the queue only grows), counter rebuilds (once per
QUOTA_RESYNC_SECONDS per scope, and after Redis loses its data), Redis or the database
on another machine (each hook is one or two round trips to each).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
if __name__ == "__main__":
    sys.path[:0] = [str(ROOT)]
    from bench.harness import bootstrap

    bootstrap("quota")

from django.conf import settings  # noqa: E402
from django.core.management import call_command  # noqa: E402

import chat.services as services  # noqa: E402
from chat.models import Run  # noqa: E402
from governance.models import Quota  # noqa: E402
from governance.usage import usage_meter_start, usage_record, usage_run_ended  # noqa: E402
from tests.factories import (  # noqa: E402
    AgentFactory,
    ChatSessionFactory,
    ProjectFactory,
    UserFactory,
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=300, help="per round and variant")
    parser.add_argument("--rounds", type=int, default=3)
    options = parser.parse_args()

    call_command("migrate", verbosity=0)
    user = UserFactory(username=f"bench-{uuid.uuid4().hex[:12]}")
    project = ProjectFactory(owner=user, name="quota bench")
    session = ChatSessionFactory(agent=AgentFactory(project=project, model="offline"))
    big = 10**15
    Quota.objects.create(
        project=project, tokens_per_day=big, tokens_per_month=big, messages_per_minute=10**9
    )
    Quota.objects.create(user=user, tokens_per_day=big, concurrent_runs=10**9)

    hooked = services.usage_admit

    @contextlib.contextmanager
    def no_admission(**_):
        yield uuid.uuid4()

    def accept(with_hooks: bool) -> tuple[float, object]:
        services.usage_admit = hooked if with_hooks else no_admission
        t0 = time.perf_counter()
        _, answer = services.message_create(session=session, content="How much is this?")
        return (time.perf_counter() - t0) * 1000, answer

    provider = SimpleNamespace(
        name="openai", usage=SimpleNamespace(prompt_tokens=120, completion_tokens=40)
    )
    messages = [{"role": "system", "content": "You help."}, {"role": "user", "content": "Hi"}]

    def run_hooks(answer) -> float:
        run = Run.objects.only("id", "agent_id", "created_at").get(message_id=answer.id)
        ids = {"run_id": run.id, "project_id": project.id, "user_id": user.id}
        t0 = time.perf_counter()
        meter = usage_meter_start(provider=provider, model="m", messages=messages)
        usage_record(
            **ids,
            attempt=1,
            agent_id=run.agent_id,
            message_id=answer.id,
            accepted_at=run.created_at,
            meter=meter,
            completion="forty tokens of answer",
            outcome="done",
        )
        usage_run_ended(**ids, meter=meter)
        return (time.perf_counter() - t0) * 1000

    for _ in range(30):  # warm up: connections, the admission script's cache, queries
        run_hooks(accept(True)[1])
        accept(False)

    rows = []
    for round_number in range(1, options.rounds + 1):
        with_ms, without_ms, hooks_ms = [], [], []
        for _ in range(options.messages):
            elapsed, answer = accept(True)
            with_ms.append(elapsed)
            hooks_ms.append(run_hooks(answer))
            without_ms.append(accept(False)[0])
        rows.append(
            (
                round_number,
                statistics.median(without_ms),
                statistics.median(with_ms),
                statistics.median(hooks_ms),
            )
        )
    services.usage_admit = hooked

    db = settings.DATABASES["default"]["ENGINE"].rsplit(".", 1)[-1]
    print(
        f"\nquota bench: {db}, Redis {settings.REDIS_URL}, {options.messages} messages per "
        f"round and variant, {os.cpu_count()} CPUs\n"
    )
    print("| round | accept without, ms p50 | accept with, ms p50 | run hooks, ms p50 "
          "| overhead per message, ms |")  # fmt: skip
    print("|------:|------:|------:|------:|------:|")
    overheads = []
    for number, without, with_, hooks in rows:
        overhead = with_ - without + hooks
        overheads.append(overhead)
        print(f"| {number} | {without:.3f} | {with_:.3f} | {hooks:.3f} | {overhead:.3f} |")
    print(
        f"\noverhead per message (p50 per round): min {min(overheads):.3f} ms, "
        f"median {statistics.median(overheads):.3f} ms, max {max(overheads):.3f} ms "
        f"(goal <= 1 ms)"
    )


if __name__ == "__main__":
    main()
