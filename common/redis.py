"""The process's Redis clients.

- `get_redis()`: REDIS_URL, where workspaces, chat streams and the registry live.
- `broker_redis()`: the Celery broker's Redis (the AgentBus's queues, active set and
  tombstones live beside the queues); the same client when both URLs are equal.

Event streams and waiting requests use the stream hub's own asyncio clients
(realtime.streamhub). Every client is plain: it reaches any key. Workspace code goes
through the scoped client of `workspaces.redis`, which prefixes every key.
"""

from __future__ import annotations

import time
from contextlib import suppress
from typing import Any
from urllib.parse import urlparse

import redis
from django.conf import settings

from .singletons import process_singleton


def client_options() -> dict[str, Any]:
    """How every Redis client of the process talks to its server, sync or asyncio: no
    reply is waited for longer than REDIS_SOCKET_TIMEOUT_SECONDS."""
    return {
        "decode_responses": True,
        "health_check_interval": 30,
        "socket_connect_timeout": 5,
        "socket_timeout": settings.REDIS_SOCKET_TIMEOUT_SECONDS,
    }


def _client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, **client_options())


def _close(client: redis.Redis) -> None:
    client.close()
    client.connection_pool.disconnect()


@process_singleton(settings=("REDIS_URL", "REDIS_SOCKET_TIMEOUT_SECONDS"), close=_close)
def get_redis() -> redis.Redis:
    """The process-wide client of REDIS_URL (one connection pool per process)."""
    return _client(settings.REDIS_URL)


@process_singleton(
    settings=("REDIS_URL", "CELERY_BROKER_URL", "REDIS_SOCKET_TIMEOUT_SECONDS"), close=_close
)
def _own_broker_redis() -> redis.Redis:
    return _client(broker_redis_url())


# The URL schemes of a Redis broker (any other broker is RabbitMQ: agentbus.broker).
REDIS_SCHEMES = ("redis", "rediss")


def is_redis_url(url: str) -> bool:
    return urlparse(url).scheme in REDIS_SCHEMES


def broker_redis_url() -> str:
    """The Redis the AgentBus keeps its queues and state in: the Celery broker when it is
    a Redis, else (RabbitMQ: only the queues are there, agentbus.broker) REDIS_URL."""
    broker = settings.CELERY_BROKER_URL or ""
    return broker if is_redis_url(broker) else settings.REDIS_URL


def broker_redis() -> redis.Redis:
    """The client of broker_redis_url(): the process's REDIS_URL client when they are
    the same."""
    if broker_redis_url() == settings.REDIS_URL:
        return get_redis()
    return _own_broker_redis()


# What a health check writes (one small key, for a minute): a Redis that is full under
# `noeviction`, a read-only replica (after a failover) or one that cannot save its
# snapshot refuses writes while it still answers PING.
HEALTH_PROBE_KEY = "uws:health:probe"
# Past this share of its `maxmemory`, a Redis that refuses writes when full is a warning.
REDIS_FULL_WARNING = 0.9


def redis_health(client: redis.Redis) -> dict[str, Any]:
    """A health check's report on one Redis: healthy when it takes a write; with how
    much memory it uses and, when it has a `maxmemory`, a warning if its policy evicts
    keys (queued messages among them) or if it is close to refusing writes."""
    started = time.perf_counter()
    try:
        client.set(HEALTH_PROBE_KEY, "1", ex=60)
    except redis.RedisError as exc:
        return {"healthy": False, "error": f"{type(exc).__name__}: {exc}"}
    report: dict[str, Any] = {
        "healthy": True,
        "latency_ms": round((time.perf_counter() - started) * 1000, 2),
    }
    with suppress(redis.RedisError):  # some hosted Redis refuse INFO: the write said enough
        memory = client.info("memory")
        limit, policy = int(memory.get("maxmemory") or 0), memory.get("maxmemory_policy")
        report["used_memory_mb"] = round(int(memory["used_memory"]) / 2**20, 1)
        if limit:
            report["maxmemory_mb"] = round(limit / 2**20, 1)
            report["maxmemory_policy"] = policy
            if policy != "noeviction":
                report["warning"] = (
                    f"maxmemory-policy is {policy}: at maxmemory Redis deletes keys, queued "
                    "messages and workspace state among them; set it to noeviction"
                )
            elif (used := int(memory["used_memory"]) / limit) >= REDIS_FULL_WARNING:
                report["warning"] = (
                    f"{used:.0%} of maxmemory used: at 100% Redis refuses every write"
                )
    return report


def close_redis() -> None:
    """Release this process's Redis connections (shutdown, tests)."""
    get_redis.cache_clear()
    _own_broker_redis.cache_clear()
