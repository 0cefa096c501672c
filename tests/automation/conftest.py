"""Fixtures of the automation tests: the runtime on the offline provider, a webhooks
worker (in this process, on the webhooks queue, as the Procfile's `webhooks` line), and
endpoints that receive deliveries over real HTTP."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from celery.contrib.testing.worker import start_worker
from django.conf import settings

from agentbus.queues import WEBHOOK_QUEUE
from config.celery_app import app
from tests.runtime.conftest import qdrant_path, runtime_settings  # noqa: F401


class Receiver:
    """An HTTP endpoint on 127.0.0.1 answering `status` (or hanging), recording what came
    and the most requests it had in flight at once. With `hold`, every request after the
    first is answered only once `hold` have been in flight at once (or after 10 s): sends
    made at once are seen at once. With `fail_from`, the n-th request and later ones answer 500."""

    def __init__(self, status: int = 204, *, hold: int = 0, fail_from: int = 0) -> None:
        self.status = status
        self.received: list[dict] = []
        self.in_flight = self.most_in_flight = 0
        gate = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                with gate:
                    receiver.received.append(
                        {"headers": dict(self.headers), "body": body.decode(), "at": time.time()}
                    )
                    number = len(receiver.received)
                    receiver.in_flight += 1
                    receiver.most_in_flight = max(receiver.most_in_flight, receiver.in_flight)
                    gate.notify_all()
                    if hold and number > 1:
                        gate.wait_for(lambda: receiver.most_in_flight >= hold, timeout=10)
                    receiver.in_flight -= 1
                failing = fail_from and number >= fail_from
                self.send_response(500 if failing else receiver.status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def bodies(self) -> list[dict]:
        return [json.loads(r["body"]) for r in self.received]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver_factory(settings):
    settings.EGRESS_ALLOW_NETWORKS = {
        **settings.EGRESS_ALLOW_NETWORKS,
        "webhooks": ["127.0.0.0/8"],
    }
    made: list[Receiver] = []

    def make(status: int = 204, **kwargs) -> Receiver:
        made.append(Receiver(status, **kwargs))
        return made[-1]

    yield make
    for receiver in made:
        receiver.stop()


@pytest.fixture
def webhooks_worker(transactional_db):
    """A real worker on the webhooks queue (threads), dedicated as in the Procfile."""
    app.conf.broker_transport = settings.AGENTBUS_WORKER_TRANSPORT or None
    try:
        with start_worker(
            app,
            pool="threads",
            concurrency=4,
            queues=[WEBHOOK_QUEUE],
            agentbus_mode="dedicated",
            perform_ping_check=False,
            loglevel="WARNING",
            shutdown_timeout=30,
        ) as worker:
            yield worker
    finally:
        app.conf.broker_transport = None
        for cached in ("queues", "router", "default_queue"):
            app.amqp.__dict__.pop(cached, None)
