"""Everything that knows kombu's or Redis's private layout, in one module.

The AgentBus leans on three things kombu does not promise:

1. How the Redis transport names a queue's lists (priority steps, separator, global
   key prefix): `queue_keys`.
2. How it records delivered, unacknowledged messages (`unacked`, a hash of delivery tag
   -> JSON [payload, exchange, routing key]): `unacked_queues`.
3. How its channel polls: one BRPOP over every followed queue after every message,
   built from scratch each time (`Channel._brpop_start`, `Transport._deliver`).

`Channel` below sends the same BRPOP with the parts that do not change between messages
cached, plus one extra key: the channel's *wake key*. Pushing to it (`wake`) ends a BRPOP
in flight, so a queue the worker just started following is polled at once instead of
after the BRPOP timeout; it needs no `CLIENT` command (refused by many managed Redis
services' ACLs). `Transport._deliver` drops the wake-up and, for a queue cancelled
because its project was deleted, the message kombu would otherwise put back.

Each of these is checked against the installed kombu by `tests/agentbus/test_transport.py`
(calling kombu's own methods). At run time the channel takes over only where it was
tested: kombu `KOMBU_TESTED`, one priority step, no global key prefix. Anywhere else it
is kombu's own channel, and the worker says so once at start (`check_kombu`).
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterable
from time import monotonic

import kombu
from django.conf import settings
from kombu.transport import redis as kombu_redis

from . import guard
from .queues import is_project_queue, project_id_from_queue

logger = logging.getLogger(__name__)

# kombu releases whose private layout this module was checked against.
KOMBU_TESTED = ("5.7.",)
# Wake keys live in the bus's namespace; each worker channel has its own.
WAKE_PREFIX = "uws:bus:wake:"
WAKE_TTL_SECONDS = 60


def kombu_tested() -> bool:
    return kombu.__version__.startswith(KOMBU_TESTED)


def check_kombu() -> bool:
    """Warn (once, at worker start) when the installed kombu is not one this module was
    tested with: the channel then behaves exactly as kombu's own."""
    if kombu_tested():
        return True
    logger.warning(
        "AgentBus: kombu %s is not one of %s: polling with kombu's own channel "
        "(no cached BRPOP, new queues wait for the BRPOP timeout)",
        kombu.__version__,
        ", ".join(f"{v}x" for v in KOMBU_TESTED),
    )
    return False


# --- 1. queue keys -----------------------------------------------------------------


def _transport_options() -> dict:
    return settings.CELERY_BROKER_TRANSPORT_OPTIONS or {}


def queue_keys(queue: str) -> list[str]:
    """The Redis lists holding one queue's messages (one per priority step), as
    kombu's `Channel._q_for_pri` names them."""
    options = _transport_options()
    steps = sorted(options.get("priority_steps") or kombu_redis.Channel.priority_steps)
    sep = options.get("sep", kombu_redis.Channel.sep)
    prefix = options.get("global_keyprefix", "") or ""
    base = prefix + queue
    return [f"{base}{sep}{p}" if p else base for p in steps]


def all_queue_keys(queues: Iterable[str]) -> list[str]:
    return [key for queue in queues for key in queue_keys(queue)]


def queue_of_key(key: str) -> str:
    """The queue a list key belongs to (inverse of `queue_keys`)."""
    options = _transport_options()
    prefix = options.get("global_keyprefix", "") or ""
    sep = options.get("sep", kombu_redis.Channel.sep)
    return key[len(prefix) :].split(sep, 1)[0] if key.startswith(prefix) else key


def queue_key_pattern(queue_prefix: str) -> str:
    """A SCAN pattern matching the list keys of every queue starting with `queue_prefix`."""
    prefix = _transport_options().get("global_keyprefix", "") or ""
    return f"{prefix}{queue_prefix}*"


# --- 2. unacknowledged messages ---------------------------------------------------


def unacked_key() -> str:
    options = _transport_options()
    prefix = options.get("global_keyprefix", "") or ""
    return prefix + options.get("unacked_key", kombu_redis.Channel.unacked_key)


def unacked_queues(client) -> set[str]:
    """Project queues with a message delivered to a worker and not acknowledged yet
    (kombu puts those back when the worker dies)."""
    queues: set[str] = set()
    for _tag, raw in client.hscan_iter(unacked_key(), count=500):
        try:
            _payload, exchange, routing_key = json.loads(raw)
        except (TypeError, ValueError):
            continue
        if not exchange and routing_key and is_project_queue(routing_key):
            queues.add(routing_key)
    return queues


# --- 3. the worker's poll ------------------------------------------------------------


def _bulk(value: bytes) -> bytes:
    """One RESP bulk string."""
    return b"$%d\r\n%s\r\n" % (len(value), value)


class Channel(kombu_redis.Channel):
    _active_snapshot: tuple | None = None
    _active_cached: list[str] = []
    _packed_keys: dict[str, bytes] = {}
    _wake_key: str | None = None

    @property
    def takes_over(self) -> bool:
        """Whether this channel polls its own way (else it is kombu's own)."""
        steps = self.priority_steps
        return (
            kombu_tested()
            and len(steps) == 1
            and not self.priority(steps[0])
            and not self.global_keyprefix
        )

    @property
    def wake_key(self) -> str:
        if self._wake_key is None:
            self._wake_key = f"{WAKE_PREFIX}{uuid.uuid4().hex}"
        return self._wake_key

    @property
    def active_queues(self) -> list[str]:
        # A tuple of the consumed queues is cheap to build and compare; kombu's own
        # property walks the list through a generator and a dict on every call.
        snapshot = (tuple(self._active_queues), len(self.active_fanout_queues))
        if snapshot != self._active_snapshot:
            fanout = self.active_fanout_queues
            active = list(dict.fromkeys(q for q in self._active_queues if q not in fanout))
            self._active_cached = active
            self._packed_keys = {q: _bulk(q.encode()) for q in active}
            self._active_snapshot = snapshot
        return self._active_cached

    def _brpop_start(self, timeout=None):
        if not self.takes_over:
            return super()._brpop_start(timeout)
        if timeout is None:
            timeout = self.brpop_timeout
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return
        packed = self._packed_keys
        try:
            keys = b"".join(map(packed.__getitem__, queues))
        except KeyError:  # the cycle names a queue the cache does not know: be kombu
            return super()._brpop_start(timeout)
        # kombu's command (BRPOP <queue key>... <timeout>) with the wake key last, so a
        # message waiting in a queue always wins over a wake-up.
        command = b"".join(
            [
                b"*%d\r\n$5\r\nBRPOP\r\n" % (len(queues) + 3),
                keys,
                _bulk(self.wake_key.encode()),
                _bulk(str(timeout or 0).encode()),
            ]
        )
        connection = self.client.connection
        self._in_poll = connection
        self._brpop_sent_at = monotonic()
        connection.send_packed_command([command])

    def wake(self) -> bool:
        """End the BRPOP in flight (if any) so the next one includes queues just added.
        Returns False where the channel is kombu's own (then the new queues wait for the
        BRPOP timeout, `brpop_timeout`, one second by default)."""
        if not self.takes_over:
            return False
        with self.conn_or_acquire() as client:
            pipe = client.pipeline(transaction=True)
            pipe.delete(self.wake_key)  # at most one wake-up waiting
            pipe.lpush(self.wake_key, "{}")
            pipe.expire(self.wake_key, WAKE_TTL_SECONDS)
            pipe.execute()
        return True


class Transport(kombu_redis.Transport):
    Channel = Channel

    def _deliver(self, message, queue):
        if queue and queue.startswith(WAKE_PREFIX):
            return  # a wake-up, not a message: the poll starts again with every queue
        # A BRPOP sent before a consumer was cancelled can still return a message of that
        # queue; kombu then puts it back. When the queue was cancelled because its
        # project was deleted, the message would only wait for the reaper's purge (its
        # task would be skipped anyway): drop it now.
        if queue and queue not in self._callbacks and _deleted_project_queue(queue):
            logger.info("dropping a message for %s: its project was deleted", queue)
            return
        return super()._deliver(message, queue)


def _deleted_project_queue(queue: str) -> bool:
    project_id = project_id_from_queue(queue)
    return project_id is not None and guard.project_gone(project_id)


def wake(channel) -> bool:
    """Wake a worker channel's poll (see `Channel.wake`); False if it cannot be woken."""
    method = getattr(channel, "wake", None)
    return bool(method()) if method is not None else False
