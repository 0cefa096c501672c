"""The one seam between the AgentBus and its broker: Redis or RabbitMQ (AMQP), chosen by
the scheme of CELERY_BROKER_URL.

On **Redis** (`redis://`, `rediss://`) a project queue is a list beside the bus's own keys
(agentbus.transport: the ready list, the publish script); nothing here is used.

On **RabbitMQ** (`amqp://`, `pyamqp://`, `amqps://`) a project queue is a durable classic
queue on the nameless exchange; the coordination state (active set, tombstones, worker
heartbeats) stays in Redis (REDIS_URL), so everything above this module is the same:

- a publish marks the queue active in Redis first (the lifecycle guard's check, one
  round trip), then declares the queue (once per connection, kombu remembers) and
  publishes on it in the same channel: the declare is processed before the publish, so
  a message never goes to a queue that does not exist yet;
- a shared worker consumes the active queues only (basic.consume per queue, cancelled
  when the queue retires); the broker round-robins between the queues of one channel
  under Celery's channel-wide prefetch (global QoS), which is the bus's fairness floor;
- a message a worker held when it died goes back to its queue at once (the broker sees
  the connection close): no visibility timeout;
- teardown deletes the queue (and what it held); the queues ever declared are kept in a
  Redis set (`AMQP_QUEUES_KEY`) so the sweeps can find them without the broker's
  management API.

Operations on the broker itself (depth, delete) open a channel from the app's connection
pool: a passive declare answers how many messages wait.

A RabbitMQ with a memory or disk alarm (cluster-wide) stops reading from every
connection that publishes until the alarm clears. The bus's publishes wait for the
broker's confirm, on connections that hear its `connection.blocked`: the publish that
meets an alarm fails at once (BrokerBlocked), and every publish of this process is
refused for AMQP_BLOCKED_RETRY_SECONDS before one tries the broker again. What the
broker held unread from that publish may still be delivered when the alarm clears
(bus tasks are idempotent; a run's attempt makes a late copy do nothing). No other wait
on the broker outlasts AMQP_TIMEOUT_SECONDS (CELERY_BROKER_TRANSPORT_OPTIONS).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Iterable, Iterator
from typing import Any
from urllib.parse import urlparse

import amqp
from celery import current_app
from django.conf import settings
from kombu.exceptions import OperationalError

from common.redis import broker_redis, is_redis_url, redis_health

logger = logging.getLogger(__name__)

AMQP_SCHEMES = ("amqp", "amqps", "pyamqp")
# Project queues ever declared on the AMQP broker (and not deleted since).
AMQP_QUEUES_KEY = "uws:bus:amqp:queues"


def scheme(url: str | None = None) -> str:
    return urlparse(url if url is not None else settings.CELERY_BROKER_URL or "").scheme


def uses_amqp(url: str | None = None) -> bool:
    """Whether the AgentBus runs on an AMQP broker (RabbitMQ)."""
    return scheme(url) in AMQP_SCHEMES


def uses_redis(url: str | None = None) -> bool:
    return is_redis_url(url if url is not None else settings.CELERY_BROKER_URL or "")


class BrokerBlocked(OperationalError):
    """RabbitMQ blocks publishing (a memory or disk alarm): the publish was not tried, or
    not confirmed. An OperationalError, as a broker that is down: a request answers 503
    with Retry-After."""


BLOCKED = "RabbitMQ blocks publishing: a memory or disk alarm is raised (see its log)"
# Per broker URL, until when (time.monotonic()) this process refuses the bus's publishes.
_blocked_until: dict[str, float] = {}


def _on_blocked(url: str, _reason: str) -> None:
    # py-amqp calls this while it reads the frame: the publish waiting for its confirm
    # stops here instead of waiting AMQP_TIMEOUT_SECONDS.
    if not amqp_blocked(url):
        logger.warning("%s: refusing the bus's publishes for a while", BLOCKED)
    _blocked_until[url] = time.monotonic() + settings.AMQP_BLOCKED_RETRY_SECONDS
    raise BrokerBlocked(BLOCKED)


def amqp_publish_options(url: str) -> dict[str, Any]:
    """Transport options of the connections the bus publishes on to the broker at `url`
    (merged over the app's): each publish waits for the broker's confirm, and the
    broker's `connection.blocked` raises BrokerBlocked in it. Such a connection is
    discarded (`collect`), not used again: the broker reads nothing more from it."""
    return {"confirm_publish": True, "on_blocked": functools.partial(_on_blocked, url)}


def amqp_blocked(url: str) -> bool:
    """Whether the broker at `url` was seen blocking publishes less than
    AMQP_BLOCKED_RETRY_SECONDS ago: the bus refuses publishes to it meanwhile."""
    return time.monotonic() < _blocked_until.get(url, 0.0)


def broker_health() -> dict[str, Any]:
    """Health's `broker`: a Redis broker takes a write (common.redis.redis_health);
    RabbitMQ gets a publish, on a connection of its own (a pooled connection would say
    only what the broker was when it was opened), to a routing key no queue has: the
    broker confirms it (healthy) or answers `connection.blocked` (an alarm: unhealthy,
    and the bus's publishes are refused as when a publish meets it)."""
    if not uses_amqp():
        return redis_health(broker_redis())
    started = time.perf_counter()
    try:
        conf = current_app.conf  # the URL the bus publishes to (agentbus.publish's key)
        options = amqp_publish_options(str(conf.broker_write_url or conf.broker_url))
        with current_app.connection_for_write(transport_options=options) as conn:
            conn.ensure_connection(max_retries=0)  # one try, no waits between tries
            try:
                conn.default_channel.basic_publish(
                    amqp.Message(b""), exchange="", routing_key="uws.health.probe"
                )
            except BrokerBlocked:
                conn.collect()  # a blocked connection's close would wait for the alarm
                raise
    except Exception as exc:  # noqa: BLE001  (reported, not raised: this is the health check)
        return {"healthy": False, "error": f"{type(exc).__name__}: {exc}"}
    return {"healthy": True, "latency_ms": round((time.perf_counter() - started) * 1000, 2)}


@contextlib.contextmanager
def _pooled() -> Iterator:
    """A connection of the app's pool. A connection error in the block (a wait past
    AMQP_TIMEOUT_SECONDS on a connection the broker stopped reading, a broker gone)
    discards it, so the pool opens a new one, and is raised as kombu's OperationalError
    (a request answers 503)."""
    with current_app.pool.acquire(block=True) as conn:
        try:
            conn.ensure_connection(max_retries=1)
            yield conn
        except conn.connection_errors as exc:
            conn.collect()
            raise OperationalError(f"{type(exc).__name__}: {exc}") from exc


@contextlib.contextmanager
def _channel() -> Iterator:
    with _pooled() as conn:
        channel = conn.channel()
        try:
            yield channel
        finally:
            with contextlib.suppress(Exception):
                channel.close()


def _is_not_found(exc: Exception) -> bool:
    return getattr(exc, "code", None) == 404 or getattr(exc, "reply_code", None) == 404


def amqp_depths(queues: Iterable[str]) -> dict[str, int]:
    """Messages waiting in each queue (a passive declare each; unacknowledged messages
    with a worker are not counted); a queue that does not exist holds 0."""
    depths: dict[str, int] = {}
    queues = list(queues)
    if not queues:
        return depths
    with _pooled() as conn:
        channel = conn.channel()
        try:
            for queue in queues:
                try:
                    _name, count, _consumers = channel.queue_declare(queue=queue, passive=True)
                except Exception as exc:
                    if not _is_not_found(exc):
                        raise
                    depths[queue] = 0
                    # The broker closed the channel on the 404: take a fresh one.
                    with contextlib.suppress(Exception):
                        channel.close()
                    channel = conn.channel()
                    continue
                depths[queue] = int(count)
        finally:
            with contextlib.suppress(Exception):
                channel.close()
    return depths


def amqp_depth(queue: str) -> int:
    return amqp_depths([queue])[queue]


def amqp_delete(queue: str) -> int:
    """Delete a queue and what it holds (its consumers are cancelled by the broker).
    Returns how many messages it held; idempotent."""
    with _channel() as channel:
        try:
            purged = int(channel.queue_delete(queue=queue) or 0)
        except Exception as exc:
            if not _is_not_found(exc):
                raise
            purged = 0
    broker_redis().srem(AMQP_QUEUES_KEY, queue)
    return purged


def amqp_known_queues() -> set[str]:
    """Project queues declared on the broker and not deleted through the bus."""
    return set(broker_redis().smembers(AMQP_QUEUES_KEY))
