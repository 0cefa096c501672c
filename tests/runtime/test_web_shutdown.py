"""SIGTERM to a web process as the Procfile starts it (uvicorn, a graceful-shutdown
window of 10 s) while clients follow event streams: each stream is told the server is
going (`stream.closed`, with a reason to reconnect) and ends, and the process exits at
once, instead of holding the streams for the whole window and then cutting them."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import httpx
import pytest
from django.conf import settings

from tests.local_http import free_port
from tests.multihost.stack import procfile
from tests.runtime.conftest import token_for
from tests.workers import database_url, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

STREAMS = 3


class Follower(threading.Thread):
    """A client following one event stream until the server ends it."""

    def __init__(self, url: str, token: str) -> None:
        super().__init__(daemon=True)
        self.url, self.token = url, token
        self.text, self.connected, self.ended, self.error = "", threading.Event(), None, None

    def run(self) -> None:
        headers = {"Authorization": f"Token {self.token}"}
        try:
            with httpx.stream("GET", self.url, headers=headers, timeout=30) as response:
                for chunk in response.iter_text():
                    self.text += chunk
                    if ": connected" in self.text:
                        self.connected.set()
            self.ended = time.monotonic()
        except httpx.HTTPError as exc:
            self.error = exc


def test_sigterm_ends_open_event_streams_and_exits_without_waiting_them_out(
    user, session, tmp_path
):
    port = free_port()
    env = dict(
        os.environ,
        DJANGO_SETTINGS_MODULE="config.settings.test",
        DATABASE_URL=database_url(),
        REDIS_URL=settings.REDIS_URL,
        CELERY_BROKER_URL=settings.CELERY_BROKER_URL,
    )
    log = open(tmp_path / "web.log", "wb")  # noqa: SIM115 (closed below)
    web = subprocess.Popen(
        procfile("web", HOST="127.0.0.1", PORT=str(port)), env=env, stdout=log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:

        def answers() -> bool:
            try:
                return httpx.get(f"{base}/my/projects/", timeout=2).status_code == 401
            except httpx.HTTPError:
                return False

        wait_until(answers, timeout=60, interval=0.2, what="the web process answering")
        url = f"{base}/my/projects/{session.project_id}/chat/{session.id}/events/"
        followers = [Follower(url, token_for(user)) for _ in range(STREAMS)]
        for follower in followers:
            follower.start()
        for follower in followers:
            assert follower.connected.wait(30), (follower.text, follower.error)

        stopped = time.monotonic()
        web.send_signal(signal.SIGTERM)
        code = web.wait(30)
        took = time.monotonic() - stopped
        for follower in followers:
            follower.join(10)
    finally:
        if web.poll() is None:
            web.kill()
            web.wait(10)
        log.close()
    output = (tmp_path / "web.log").read_text(errors="replace")
    print(f"SIGTERM to exit with {STREAMS} streams open: {took:.2f}s (window 10s)")
    assert code is not None and "graceful shutdown exceeded" not in output, output
    assert took < 5, (took, output)  # not the 10 s window
    for follower in followers:
        assert follower.error is None and follower.ended is not None, follower.error
        assert follower.text.rstrip().endswith(
            'event: stream.closed\ndata: {"reason": "server stopping; reconnect"}'
        ), follower.text
