"""kombu's Redis transport with a cheaper poll for workers that follow many queues.

After every message kombu's Redis channel sends one BRPOP over every followed queue,
and builds it from scratch: it recomputes the list of active queues (several times
per message), derives each queue's key through the priority-step lookup, and packs
every key into the command. With 1,000 queues that client-side work is about 0.5 ms
per message, about as much as the rest of a no-op task's trip through the worker.

This channel keeps the same BRPOP (same keys, same round-robin order, so the same
fairness) but caches what does not change between messages: the active-queue list
(until a consumer is added or cancelled) and each queue's encoded part of the command.
It only takes over in the plain layout this project uses (one priority step, no
global key prefix); otherwise kombu's own code runs. It also drops, rather than puts
back, a message that arrives for a cancelled queue of a deleted project.

Selected for redis:// and rediss:// brokers in config/celery_app.py.
"""

from __future__ import annotations

import logging
from time import monotonic

from kombu.transport import redis as kombu_redis

logger = logging.getLogger(__name__)


class Channel(kombu_redis.Channel):
    _active_snapshot: tuple | None = None
    _active_cached: list[str] = []
    _packed_keys: dict[str, bytes] = {}

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

    def _plain_layout(self) -> bool:
        steps = self.priority_steps
        return len(steps) == 1 and not self.priority(steps[0]) and not self.global_keyprefix

    def _brpop_start(self, timeout=None):
        if not self._plain_layout():
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
        # The same command kombu sends: BRPOP <queue key>... <timeout>.
        command = b"".join(
            [
                b"*%d\r\n$5\r\nBRPOP\r\n" % (len(queues) + 2),
                keys,
                _bulk(str(timeout or 0).encode()),
            ]
        )
        connection = self.client.connection
        self._in_poll = connection
        self._brpop_sent_at = monotonic()
        connection.send_packed_command([command])


def _bulk(value: bytes) -> bytes:
    """One RESP bulk string."""
    return b"$%d\r\n%s\r\n" % (len(value), value)


class Transport(kombu_redis.Transport):
    Channel = Channel

    def _deliver(self, message, queue):
        # A BRPOP sent before a consumer was cancelled can still return a message of
        # that queue; kombu then puts it back. When the queue was cancelled because
        # its project was deleted, the message would only sit there until the reaper
        # purges it (its task would be skipped anyway): drop it now.
        if queue and queue not in self._callbacks and _deleted_project_queue(queue):
            logger.info("dropping a message for %s: its project was deleted", queue)
            return
        return super()._deliver(message, queue)


def _deleted_project_queue(queue: str) -> bool:
    from .bus import get_agent_bus
    from .queues import project_id_from_queue

    project_id = project_id_from_queue(queue)
    return project_id is not None and get_agent_bus().is_tombstoned(project_id)
