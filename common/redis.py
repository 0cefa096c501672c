"""The process's Redis clients.

- `get_redis()`: REDIS_URL, where workspaces, chat streams and the registry live.
- `broker_redis()`: the Celery broker's Redis (the AgentBus's queues, active set and
  tombstones live beside the queues); the same client when both URLs are equal.
- `get_async_redis()`: an asyncio client of REDIS_URL for the running event loop.

Every client is plain: it reaches any key. Workspace code goes through the scoped client
of `workspaces.redis`, which prefixes every key.
"""

from __future__ import annotations

import asyncio
import weakref

import redis
import redis.asyncio
from django.conf import settings

from .singletons import process_singleton


def _client(url: str) -> redis.Redis:
    return redis.Redis.from_url(
        url,
        decode_responses=True,
        health_check_interval=30,
        socket_connect_timeout=5,
        socket_timeout=30,
    )


def _close(client: redis.Redis) -> None:
    client.close()
    client.connection_pool.disconnect()


@process_singleton(settings=("REDIS_URL",), close=_close)
def get_redis() -> redis.Redis:
    """The process-wide client of REDIS_URL (one connection pool per process)."""
    return _client(settings.REDIS_URL)


@process_singleton(settings=("REDIS_URL", "CELERY_BROKER_URL"), close=_close)
def _own_broker_redis() -> redis.Redis:
    return _client(settings.CELERY_BROKER_URL)


def broker_redis() -> redis.Redis:
    """The client of the Celery broker's Redis."""
    if settings.CELERY_BROKER_URL == settings.REDIS_URL:
        return get_redis()
    return _own_broker_redis()


def close_redis() -> None:
    """Release this process's Redis connections (shutdown, tests)."""
    get_redis.cache_clear()
    _own_broker_redis.cache_clear()


_async_clients: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def get_async_redis(*, max_connections: int | None = None) -> redis.asyncio.Redis:
    """The asyncio client of REDIS_URL for the running event loop (one pool per loop)."""
    loop = asyncio.get_running_loop()
    client = _async_clients.get(loop)
    if client is None:
        client = redis.asyncio.Redis.from_url(
            settings.REDIS_URL,
            decode_responses=True,
            socket_connect_timeout=5,
            # Above the longest blocking read (XREAD BLOCK) issued through it.
            socket_timeout=60,
            health_check_interval=30,
            max_connections=max_connections,
        )
        _async_clients[loop] = client
    return client


async def close_async_redis() -> None:
    """Close the running loop's client (ASGI lifespan shutdown, tests)."""
    client = _async_clients.pop(asyncio.get_running_loop(), None)
    if client is not None:
        await client.aclose()
