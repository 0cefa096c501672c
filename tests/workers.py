"""A real Celery worker in the test process, configured exactly like the shared pool."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def shared_pool_worker() -> Iterator:
    """Start a worker (threads pool, 2 threads) that follows the maintenance queue and the
    queues of active projects as the shared pool does (the AgentBus bootstep: broadcasts
    plus the periodic reconcile), through the workers' own broker transport. Yields the
    WorkController once its mailbox answers, so broadcasts sent after that reach it."""
    from celery.contrib.testing.worker import start_worker
    from django.conf import settings

    from agentbus.queues import MAINTENANCE_QUEUE
    from config.celery_app import app

    app.conf.broker_transport = settings.AGENTBUS_WORKER_TRANSPORT or None
    try:
        with start_worker(
            app,
            pool="threads",
            concurrency=2,
            queues=[MAINTENANCE_QUEUE],
            agentbus_mode="shared",
            perform_ping_check=False,
            loglevel="WARNING",
            shutdown_timeout=30,
        ) as worker:
            deadline = time.monotonic() + 10
            while not app.control.ping(destination=[worker.hostname], timeout=0.2):
                assert time.monotonic() < deadline, "the live worker does not answer"
            yield worker
    finally:
        app.conf.broker_transport = None
        # The worker narrowed and extended the app's queue table; the next one starts clean.
        for cached in ("queues", "router", "default_queue"):
            app.amqp.__dict__.pop(cached, None)
