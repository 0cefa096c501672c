"""A worker host whose clock is wrong: what it writes to be judged by other hosts (its
heartbeats, its runs' leases) is timed by Redis's and the database's clocks, so it is
seen alive and keeps its runs. The host is a worker process run under libfaketime
(Debian's `faketime`), its clock a minute behind; skipped where that is not installed."""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from django.db import connection  # noqa: F401  (the skip's condition reads it)

from agentbus import live_workers
from chat.dispatch import runs_recover
from chat.models import Message, Run
from common.redis import get_redis
from tests.factories import AgentFactory, ChatSessionFactory, ProjectFactory
from tests.runtime.conftest import stream_events
from tests.runtime.test_durability import LEASE_SECONDS, finished, post
from tests.workers import wait_for, wait_until

FAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(
        not FAKETIME.exists(), reason="libfaketime is not installed (Debian: apt install faketime)"
    ),
    # SQLite's clock is the clock of the process that asks: a database of one host.
    pytest.mark.skipif("connection.vendor != 'postgresql'", reason="the database is one host's"),
]


def test_a_worker_whose_clock_is_a_minute_behind_is_alive_and_keeps_its_run(
    api, user, worker_process, fake_openai, tmp_path, settings
):
    """Its heartbeats would be a minute old on arrival (live means within three
    AGENTBUS_HEARTBEAT_SECONDS), its runs' leases would end before they began: the
    recovery pass would take its run back on every pass."""
    settings.RUN_LEASE_SECONDS = LEASE_SECONDS
    fake_openai.mode, fake_openai.delay = "slow", 0.2
    fake_openai.tokens = [f"w{i} " for i in range(20)]  # 4 s: the pass runs meanwhile
    agent = AgentFactory(project=ProjectFactory(owner=user), model="gpt-local")
    session = ChatSessionFactory(agent=agent, project=agent.project)
    env = {
        "OPENAI_BASE_URL": fake_openai.base_url,
        "OPENAI_API_KEY": "test-key",
        "RUN_LEASE_SECONDS": str(LEASE_SECONDS),
        "QDRANT_PATH": str(tmp_path / "qdrant"),
        "LD_PRELOAD": str(FAKETIME),
        "FAKETIME": "-60s",
        "DONT_FAKE_MONOTONIC": "1",  # timeouts and intervals run as they do anywhere
    }
    worker = worker_process("-P", "threads", "-c", "2", env=env)
    worker.wait_started()
    # Its log's clock: a minute behind this one's.
    stamps = re.findall(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),\d{3} ", worker.log(), re.M)
    behind = datetime.now() - datetime.strptime(stamps[-1], "%Y-%m-%d %H:%M:%S")
    assert timedelta(seconds=50) < behind < timedelta(seconds=90), stamps[-1]
    assert wait_for(lambda: worker.name in {w["name"] for w in live_workers()}, timeout=15), (
        f"not seen alive: {live_workers()}"
    )

    answer_id = post(api, session, "Tell me something long")
    wait_until(lambda: Message.objects.get(id=answer_id).status == "streaming", what="the answer")

    def settled() -> bool:
        runs_recover()  # beat's pass, from this host (its clock right)
        return finished([answer_id])

    assert wait_for(settled, timeout=60, interval=0.5), worker.log()[-3000:]
    run = Run.objects.get(message_id=answer_id)
    assert (run.status, run.starts, run.attempt) == ("done", 1, 1)
    kinds = [k for _, k, _d in stream_events(get_redis(), agent.project, session.id)]
    assert "message.restarted" not in kinds and kinds.count("message.completed") == 1
