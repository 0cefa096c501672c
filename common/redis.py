"""The process's Redis clients.

- `get_redis()`: REDIS_URL, where workspaces, chat streams and the registry live.
- `broker_redis()`: the Celery broker's Redis (the AgentBus's queues, active set and
  tombstones live beside the queues); the same client when both URLs are equal.

Event streams and waiting requests use the stream hub's own asyncio clients
(realtime.streamhub). Every client is plain: it reaches any key. Workspace code goes
through the scoped client of `workspaces.redis`, which prefixes every key.
"""

from __future__ import annotations

import redis
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
    """The client of the Celery broker's Redis; REDIS_URL's when the broker is not a
    Redis (RabbitMQ: the bus keeps its coordination state there, agentbus.broker)."""
    broker = settings.CELERY_BROKER_URL or ""
    if broker == settings.REDIS_URL or broker.startswith(("amqp://", "amqps://", "pyamqp://")):
        return get_redis()
    return _own_broker_redis()


def close_redis() -> None:
    """Release this process's Redis connections (shutdown, tests)."""
    get_redis.cache_clear()
    _own_broker_redis.cache_clear()
