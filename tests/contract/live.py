"""The whole web app under a real ASGI server (uvicorn in a thread of the test process),
for clients that must talk HTTP to it: schemathesis, the generated client, a browser.

It serves the test database (tests using it need `transactional_db`, so the rows they
create are committed and visible to the server's threads) and the suite's Redis.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import uvicorn
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler

from common.asgi import StreamingAwareASGIHandler


class LiveServer:
    """`static=True` also serves static files (admin, Swagger UI, ReDoc) from the apps, as
    `make run` does through WhiteNoise (whose folder of collected files is empty here)."""

    def __init__(self, *, static: bool = False) -> None:
        handler = StreamingAwareASGIHandler()
        if static:
            handler = ASGIStaticFilesHandler(handler)
        self.loop: asyncio.AbstractEventLoop | None = None

        async def django_application(scope, receive, send):
            self.loop = asyncio.get_running_loop()
            await handler(scope, receive, send)

        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            django_application, lifespan="off", log_level="warning", timeout_keep_alive=5
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def start(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()
