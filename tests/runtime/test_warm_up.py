"""A worker that runs agents loads the provider client and the embedder as it starts
(chat.receivers.runs_warm_up), so the first runs of a burst do not all wait on the import
lock for them. A real worker process (the Procfile's thread pool)."""

from __future__ import annotations

import pytest

from agentbus import MAINTENANCE_QUEUE
from tests.workers import wait_for

pytestmark = [pytest.mark.slow]


def test_a_worker_that_runs_agents_loads_the_provider_and_the_embedder_as_it_starts(
    transactional_db, worker_process, tmp_path
):
    worker = worker_process(
        "-Q", MAINTENANCE_QUEUE, "--pool=threads", "--concurrency=2",
        env={
            "QDRANT_PATH": str(tmp_path / "qdrant"),
            "OPENAI_BASE_URL": "http://127.0.0.1:9/v1",
            "WORKER_WARM_UP": "1",  # the test settings turn it off for the suite's workers
        },
    )  # fmt: skip
    warm = "runs warm: provider client and embedder loaded"
    assert wait_for(lambda: warm in worker.log(), timeout=60, interval=0.2), worker.log()
