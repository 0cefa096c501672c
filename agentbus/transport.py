"""Everything that knows kombu's or Redis's private layout, in one module.

The AgentBus leans on three things kombu does not promise:

1. How the Redis transport names a queue's lists (priority steps, separator, global
   key prefix): `queue_keys`.
2. How it records delivered, unacknowledged messages (`unacked`, a hash of delivery tag
   -> JSON [payload, exchange, routing key]): `unacked_queues`.
3. How its channel polls: one BRPOP over every followed queue after every message,
   built from scratch each time, and the fair cycle rebuilt for every queue followed
   (`Channel._brpop_start`, `_update_queue_cycle`, `Transport._deliver`), and how a
   delivered message is recorded (`QoS.append`).

`Channel` below polls the same way with what does not change between messages cached,
plus:

- a *wake key* of its own: pushing to it (`wake`) ends a BRPOP in flight, so a queue the
  worker just started following is polled at once (it needs no `CLIENT` command, which
  many managed Redis services' ACLs refuse); newly followed queues come first in the
  next poll;
- following or leaving many queues at once rebuilds the cycle once (`batched`), not
  once per queue;
- a bounded poll: over AGENTBUS_POLL_WINDOW followed queues, each BRPOP names one
  window of them (plus the keys below), the windows take turns, and a *bell* list that
  producers ring when a queue goes from empty to non-empty (`active.mark_active`) puts
  that queue in the next window, so the cost of one poll does not grow with every
  active project;
- `QoS.append` records a delivered message exactly as kombu does and, in the same round
  trip, whether its project was deleted (the lifecycle guard), carried to the task in a
  header so the task need not ask again.

`Transport._deliver` drops wake-ups and bells (they are not messages) and, for a queue
cancelled because its project was deleted, the message kombu would otherwise put back.

Each of these is checked against the installed kombu by `tests/agentbus/test_transport.py`
(calling kombu's own methods). At run time the channel takes over only where it was
tested: kombu `KOMBU_TESTED`, one priority step, no global key prefix. Anywhere else it
is kombu's own channel, and the worker says so once at start (`check_kombu`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid
from collections.abc import Iterable, Iterator
from time import monotonic

import kombu
from django.conf import settings
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual

from . import guard
from .queues import is_project_queue, project_id_from_queue

logger = logging.getLogger(__name__)

# kombu releases whose private layout this module was checked against.
KOMBU_TESTED = ("5.7.",)
# Wake keys live in the bus's namespace; each worker channel has its own.
WAKE_PREFIX = "uws:bus:wake:"
WAKE_TTL_SECONDS = 60
# Producers ring it with a queue's name when the queue goes from empty to non-empty.
BELL_KEY = "uws:bus:bell"
BELL_MAX = 4096
# Headers a worker's channel adds to a delivered project task (read by AgentBusTask).
GONE_HEADER = "agentbus_gone"
CHECKED_HEADER = "agentbus_checked_at"


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


class QoS(kombu_redis.QoS):
    def append(self, message, delivery_tag):
        """kombu's own record of a delivered message (unacked index and hash, one
        pipeline), plus, for a project's task, whether the project was deleted."""
        delivery = message.delivery_info
        exchange, routing_key = delivery["exchange"], delivery["routing_key"]
        project_id = project_id_from_queue(routing_key) if not exchange else None
        with self.pipe_or_acquire() as pipe:
            pipe.zadd(self.unacked_index_key, {delivery_tag: time.time()}).hset(
                self.unacked_key, delivery_tag, json.dumps([message._raw, exchange, routing_key])
            )
            if project_id is not None and self.channel.takes_over:
                pipe.exists(guard.tombstone_key(project_id))
            replies = pipe.execute()
        if project_id is not None and self.channel.takes_over and message.headers is not None:
            message.headers[GONE_HEADER] = bool(replies[-1])
            message.headers[CHECKED_HEADER] = time.time()
        virtual.QoS.append(self, message, delivery_tag)


class Channel(kombu_redis.Channel):
    QoS = QoS
    _wake_key: str | None = None
    _version = 0
    _deferring = False
    _deferred = False
    _window_start = 0
    _broker = None  # the kombu Connection this channel was opened on

    def __init__(self, *args, **kwargs):
        # Before kombu's own setup: basic_consume may run during it.
        self._first: list[str] = []  # polled first: just followed, or rung
        self._active_key: tuple | None = None
        self._active_cached: list[str] = []
        self._packed_keys: dict[str, bytes] = {}
        super().__init__(*args, **kwargs)
        self._broker = self.connection.client  # see _connparams

    def _connparams(self, asynchronous=False):
        """kombu's, also once the transport was detached from its connection.

        When a worker loses the broker, Celery detaches the transport
        (`Connection.collect`) and closes the connection; a channel closing after that
        gives its unacknowledged messages back, and task threads still acknowledge.
        Both need a Redis client, whose parameters kombu reads from the transport's
        connection, by then None: an AttributeError nothing expects, which stopped the
        whole worker ("Unrecoverable error") instead of letting it reconnect. The
        channel keeps its own reference to where the broker is.
        """
        transport = self.connection
        if transport.client is not None or self._broker is None:
            return super()._connparams(asynchronous=asynchronous)
        self.connection = _Attached(transport, self._broker)
        try:
            return super()._connparams(asynchronous=asynchronous)
        finally:
            self.connection = transport

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

    # --- the followed queues and their cycle ------------------------------------------------

    @property
    def active_queues(self) -> list[str]:
        # Rebuilt only when the followed queues changed (every change goes through
        # _update_queue_cycle); kombu's own property walks them all on every call.
        key = self._snapshot_key()
        if key != self._active_key:
            fanout = self.active_fanout_queues
            active = list(dict.fromkeys(q for q in self._active_queues if q not in fanout))
            packed = self._packed_keys
            self._packed_keys = {q: packed.get(q) or _bulk(q.encode()) for q in active}
            self._active_cached = active
            self._active_key = key
        return self._active_cached

    def _update_queue_cycle(self):
        self._version += 1
        if self._deferring:
            self._deferred = True
            return
        super()._update_queue_cycle()

    @contextlib.contextmanager
    def batched(self) -> Iterator[None]:
        """Follow or leave many queues with one rebuild of the cycle at the end."""
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False
            if self._deferred:
                self._deferred = False
                super()._update_queue_cycle()

    def basic_consume(self, queue, *args, **kwargs):
        current = self._active_key == self._snapshot_key()
        ret = super().basic_consume(queue, *args, **kwargs)
        if current and queue not in self._packed_keys and queue not in self.active_fanout_queues:
            # One more queue: extend the cached list instead of rebuilding it.
            self._active_cached.append(queue)
            self._packed_keys[queue] = _bulk(queue.encode())
            self._active_key = self._snapshot_key()
        self._first.append(queue)  # a new queue is polled first: its task may be waiting
        return ret

    def _snapshot_key(self) -> tuple:
        return (self._version, len(self._active_queues), len(self.active_fanout_queues))

    def prioritise(self, queue: str) -> None:
        if queue in self._packed_keys:
            self._first.append(queue)

    # --- polling ---------------------------------------------------------------------------

    def _poll_keys(self) -> tuple[list[str], float]:
        """The queues of the next BRPOP, and its timeout."""
        self.active_queues  # noqa: B018  (refreshes the packed keys if the queues changed)
        items = self._queue_cycle.items
        window = settings.AGENTBUS_POLL_WINDOW
        first = [q for q in dict.fromkeys(self._first) if q in self._packed_keys][:window]
        self._first.clear()
        if len(items) <= window:
            if not first:
                return list(items), self.brpop_timeout
            chosen = set(first)
            return first + [q for q in items if q not in chosen], self.brpop_timeout
        start = self._window_start % len(items)
        turn = items[start : start + window]
        if len(turn) < window:
            turn += items[: window - len(turn)]
        self._window_start = start + window
        chosen = set(first)
        # The other windows wait their turn: a short block, so it comes round quickly.
        return first + [q for q in turn if q not in chosen], settings.AGENTBUS_POLL_WINDOW_TIMEOUT

    def _brpop_start(self, timeout=None):
        if not self.takes_over:
            return super()._brpop_start(timeout)
        if not self.active_queues:
            return
        queues, window_timeout = self._poll_keys()
        if timeout is None:
            timeout = window_timeout
        packed = self._packed_keys
        try:
            keys = b"".join(map(packed.__getitem__, queues))
        except KeyError:  # a queue the cache does not know: be kombu
            return super()._brpop_start(timeout)
        extra = [self.wake_key]
        if len(self._queue_cycle.items) > settings.AGENTBUS_POLL_WINDOW:
            extra.insert(0, BELL_KEY)
        # kombu's command (BRPOP <queue key>... <timeout>) with our keys last, so a message
        # waiting in a queue always wins over a wake-up or a bell.
        command = b"".join(
            [
                b"*%d\r\n$5\r\nBRPOP\r\n" % (len(queues) + len(extra) + 2),
                keys,
                *(_bulk(k.encode()) for k in extra),
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


class _Attached:
    """A detached transport seen with the connection it had (`Channel._connparams`)."""

    def __init__(self, transport, client) -> None:
        self._transport, self.client = transport, client

    def __getattr__(self, name):
        return getattr(self._transport, name)


class Transport(kombu_redis.Transport):
    Channel = Channel

    def _deliver(self, message, queue):
        if queue and queue.startswith(WAKE_PREFIX):
            return  # a wake-up, not a message: the poll starts again with every queue
        if queue == BELL_KEY:
            # A queue went from empty to non-empty: poll it next (`message` is its name).
            for channel in self.channels:
                if isinstance(message, str) and hasattr(channel, "prioritise"):
                    channel.prioritise(message)
            return
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


def batched(channel):
    """`Channel.batched` where the channel has it, else nothing special."""
    method = getattr(channel, "batched", None)
    return method() if method is not None else contextlib.nullcontext()
