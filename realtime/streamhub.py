"""One reader for every open event stream of a web process.

A stream used to hold a Redis connection of its own, blocked in XREAD, for as long as
its client stayed: a process with thousands of open streams held thousands of
connections (and the asyncio pool's default cap turned the 101st into a 500). Here one
`StreamHub` per event loop serves them all on a handful of connections:

- Writers publish the stream's key on a Redis channel of the same name with every
  append (chat.streams, realtime.replies). The hub keeps ONE pub/sub connection subscribed to
  the keys of the streams open here.
- A notified key is read with one XREAD (non-blocking, many keys at once, on the small
  pool) from the last id the hub delivered, and its entries go to every subscription of
  that key, in order.
- A new subscription subscribes first, then reads what it missed (from its cursor) and
  only then takes the live entries, skipping ids it already has: nothing is lost or
  repeated between the two. The backlog read goes on another connection than the
  SUBSCRIBE, so Redis may serve it first; an entry written between the two would be in
  neither. The hub therefore reads a key again when Redis confirms its subscription:
  whatever was published before that is in the stream by then.
- What streams ask while they open (the lifecycle guard, the cursor, what they missed)
  goes through `Pipelined`: every command asked for while a round trip is under way
  goes out in the next one, so a crowd opening at once shares a few round trips on one
  connection instead of queueing for the pool one command at a time.
- A stream that wants heartbeats gets HEARTBEAT from one timer of the hub when it was
  quiet for CHAT_HEARTBEAT_SECONDS, instead of from a timer of its own re-armed with
  every event.
- Every SSE_SAFETY_POLL_SECONDS the hub reads every followed key once (a notification
  lost while the pub/sub connection reconnected costs that long, never an event) and
  asks the lifecycle guard about every followed project in one round trip: streams of
  a deleted project are closed.
- Redis down or restarting: the open streams stay (the hub reconnects, subscribes
  again and reads what came meanwhile); a stream opening meanwhile waits for it up to
  SSE_REDIS_WAIT_SECONDS to read what it missed, then its caller is told
  (`StreamUnavailable`).

Connections: the pub/sub one, the pool's (SSE_REDIS_CONNECTIONS at most), and one to
the broker when it is another Redis.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import uuid
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import redis.asyncio
from django.conf import settings

from agentbus.guard import tombstone_key
from common.redis import broker_redis_url, client_options

logger = logging.getLogger(__name__)

LAST_ID = f"{2**64 - 1}-{2**64 - 1}"
READ_COUNT = 200
CLOSED = "closed"
HEARTBEAT = "heartbeat"
STOPPING = "stopping"  # the process is stopping: the stream ends, its client reconnects


class Inbox:
    """What a subscription was handed, in order, for its one reader: asyncio.Queue's
    put_nowait / get / empty without its bookkeeping (bounds, task counts, several
    readers), which an event paid once per open stream."""

    __slots__ = ("items", "waiter")

    def __init__(self) -> None:
        self.items: collections.deque = collections.deque()
        self.waiter: asyncio.Future | None = None

    def put_nowait(self, item) -> None:
        self.items.append(item)
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def empty(self) -> bool:
        return not self.items

    async def get(self):
        while not self.items:
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
        return self.items.popleft()


@dataclass(eq=False)
class Subscription:
    key: str
    project_id: uuid.UUID
    last_id: str
    heartbeat: bool = False  # HEARTBEAT in its inbox when quiet
    quiet: bool = True  # nothing put in its inbox since the hub's last heartbeat tick
    inbox: Inbox = field(default_factory=Inbox)

    def deliver(self, entries: list, first: tuple[int, int] | None = None) -> None:
        """Hand over the entries after its last id (`first`: the first one's, parsed)."""
        last = _id(self.last_id)
        # All new (ids ascend): the very list every subscriber of the key gets.
        if (first or _id(entries[0][0])) > last:
            fresh = entries
        else:
            fresh = [e for e in entries if _id(e[0]) > last]
        if fresh:
            self.last_id = fresh[-1][0]
            self.quiet = False
            self.inbox.put_nowait(fresh)


class Pipelined:
    """A client whose commands, asked for by many coroutines at once, go to Redis
    together: one pipeline per round trip, one round trip at a time, each carrying every
    command asked for while the previous one was under way. A command's error (or the
    round trip's) is its caller's only."""

    def __init__(self, client: redis.asyncio.Redis) -> None:
        self.client = client
        self.queued: list[tuple[str, tuple, dict, asyncio.Future]] = []
        self._sending: asyncio.Task | None = None

    def __getattr__(self, command: str):
        if not callable(getattr(redis.asyncio.client.Pipeline, command, None)):
            raise AttributeError(command)

        async def call(*args, **kwargs):
            future = asyncio.get_running_loop().create_future()
            self.queued.append((command, args, kwargs, future))
            if self._sending is None or self._sending.done():
                self._sending = asyncio.create_task(self._send(), name="sse-hub-pipeline")
            return await future

        return call

    async def _send(self) -> None:
        while self.queued:
            batch, self.queued = self.queued, []
            pipe = self.client.pipeline(transaction=False)
            for command, args, kwargs, _ in batch:
                getattr(pipe, command)(*args, **kwargs)
            try:
                results = await pipe.execute(raise_on_error=False)
            except BaseException as exc:
                for *_, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                continue
            for (*_, future), result in zip(batch, results, strict=True):
                if future.done():  # its caller went away
                    continue
                if isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    future.set_result(result)


class HubFull(Exception):
    """This process serves SSE_MAX_STREAMS streams already."""


class StreamUnavailable(redis.ConnectionError):
    """Redis did not answer a stream opening within SSE_REDIS_WAIT_SECONDS (a Redis
    error, as its callers already handle one)."""


def _id(value: str) -> tuple[int, int]:
    ms, _, seq = value.partition("-")
    return int(ms), int(seq or 0)


class StreamHub:
    def __init__(self) -> None:
        # A blocking pool: with every connection busy, a command waits its turn (up to
        # SSE_REDIS_WAIT_SECONDS) instead of failing at once, so many requests
        # arriving together (streams opening, searches admitted) share the few.
        self.client = redis.asyncio.Redis.from_pool(
            redis.asyncio.BlockingConnectionPool.from_url(
                settings.REDIS_URL,
                **client_options(),
                max_connections=settings.SSE_REDIS_CONNECTIONS,
                timeout=settings.SSE_REDIS_WAIT_SECONDS,
            )
        )
        self.pipelined = Pipelined(self.client)
        # The bus's state (a deleted project's tombstone): REDIS_URL's unless the broker
        # is another Redis (on RabbitMQ it is REDIS_URL's too).
        if broker_redis_url() == settings.REDIS_URL:
            self.broker = self.client
            self.broker_pipelined = self.pipelined
        else:
            self.broker = redis.asyncio.Redis.from_url(
                broker_redis_url(), **client_options(), max_connections=1
            )
            self.broker_pipelined = Pipelined(self.broker)
        # Subscription confirmations are wanted: each one has the key read again (above).
        self.pubsub = self.client.pubsub()
        self.subscriptions: dict[str, set[Subscription]] = {}
        self.delivered: dict[str, str] = {}  # key -> last id read for it
        self.dirty: set[str] = set()
        self.unsubscribed: set[str] = set()  # followed, their SUBSCRIBE failed
        self._dirty_event = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._lock = asyncio.Lock()
        self.count = 0
        self.stopping = False

    # --- subscribing ------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def subscribe(
        self, *, key: str, project_id: uuid.UUID, cursor: str, heartbeat: bool = False
    ) -> AsyncIterator[Subscription]:
        """A subscription to the stream `key`: entries after `cursor`; with `heartbeat`,
        HEARTBEAT too when it was quiet for CHAT_HEARTBEAT_SECONDS."""
        if self.count >= settings.SSE_MAX_STREAMS:
            raise HubFull()
        self.count += 1
        self._start()
        sub: Subscription | None = None
        try:
            async with self._lock:
                if key not in self.subscriptions:
                    self.subscriptions[key] = set()
                    try:
                        await self.pubsub.subscribe(key)
                    except redis.RedisError:
                        # The listener subscribes it once Redis answers again (and the
                        # safety poll reads it meanwhile).
                        self.unsubscribed.add(key)
                sub = Subscription(
                    key=key, project_id=project_id, last_id=cursor, heartbeat=heartbeat
                )
                self.subscriptions[key].add(sub)
                self.delivered.setdefault(key, cursor)
                if self.stopping:
                    sub.inbox.put_nowait(STOPPING)
            # What it missed, read after subscribing: the live entries that arrive
            # meanwhile are skipped by id if this read has them too.
            backlog = await self._missed(key, cursor)
            while backlog:
                sub.deliver(backlog)
                if len(backlog) < READ_COUNT:
                    break
                backlog = await self._missed(key, sub.last_id)
            yield sub
        finally:
            self.count -= 1
            if sub is not None:
                await self._unsubscribe(sub)

    async def _missed(self, key: str, cursor: str) -> list:
        """`_read_after`, waiting out Redis down or restarting (a stream's response has
        begun: failing it cuts its client off) for up to SSE_REDIS_WAIT_SECONDS."""
        deadline = asyncio.get_running_loop().time() + settings.SSE_REDIS_WAIT_SECONDS
        pause = 0.05
        while True:
            try:
                return await self._read_after(key, cursor)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                if asyncio.get_running_loop().time() + pause > deadline:
                    raise StreamUnavailable(str(exc)) from exc
                logger.warning("event streams: Redis unavailable as a stream opens; waiting")
                await asyncio.sleep(pause)
                pause = min(pause * 2, 1.0)

    async def _read_after(self, key: str, cursor: str) -> list:
        # `(id` is refused for the largest id (2**64-1 twice), after which nothing can come.
        if cursor == LAST_ID:
            return []
        return await self.pipelined.xrange(key, min=f"({cursor}", count=READ_COUNT)

    async def _unsubscribe(self, sub: Subscription) -> None:
        async with self._lock:
            subs = self.subscriptions.get(sub.key)
            if subs is None:
                return
            subs.discard(sub)
            if not subs:
                del self.subscriptions[sub.key]
                self.delivered.pop(sub.key, None)
                self.dirty.discard(sub.key)
                self.unsubscribed.discard(sub.key)
                with contextlib.suppress(Exception):
                    await self.pubsub.unsubscribe(sub.key)

    # --- reading -------------------------------------------------------------------------------

    def _start(self) -> None:
        if self._tasks and not any(t.done() for t in self._tasks):
            return
        for task in self._tasks:
            task.cancel()
        self._tasks = [
            asyncio.create_task(self._listen(), name="sse-hub-listen"),
            asyncio.create_task(self._fetch(), name="sse-hub-fetch"),
            asyncio.create_task(self._patrol(), name="sse-hub-patrol"),
            asyncio.create_task(self._beat(), name="sse-hub-heartbeat"),
        ]

    async def _listen(self) -> None:
        """Notifications, and confirmations of new subscriptions: mark the keys to read."""
        while True:
            try:
                if self.unsubscribed:
                    await self._resubscribe()
                if not self.pubsub.subscribed:
                    await asyncio.sleep(0.05)
                    continue
                message = await self.pubsub.get_message(timeout=1.0)
                if message and message.get("type") in ("message", "subscribe"):
                    self.dirty.add(message["channel"])
                    self._dirty_event.set()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.warning("event streams: notifications interrupted", exc_info=True)
                await asyncio.sleep(1)
                await self._resubscribe()

    async def _resubscribe(self) -> None:
        keys = list(self.subscriptions)
        try:
            if keys:
                await self.pubsub.subscribe(*keys)
            self.unsubscribed.clear()
        except Exception:
            self.unsubscribed.update(keys)
            await asyncio.sleep(1)  # Redis still down: the next try after a pause
        self.dirty.update(self.subscriptions)  # whatever was missed meanwhile
        self._dirty_event.set()

    async def _fetch(self) -> None:
        """Read the marked keys (one XREAD for all of them) and hand out the entries."""
        while True:
            await self._dirty_event.wait()
            self._dirty_event.clear()
            keys = [k for k in self.dirty if k in self.subscriptions]
            self.dirty.clear()
            if not keys:
                continue
            try:
                await self._read(keys)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.warning("event streams: read failed", exc_info=True)
                self.dirty.update(keys)
                await asyncio.sleep(0.5)
                self._dirty_event.set()

    async def _read(self, keys: list[str]) -> None:
        streams = {k: self.delivered.get(k, "0-0") for k in keys}
        answer = await self.client.xread(streams, count=READ_COUNT)
        for key, entries in answer or ():
            if key not in self.subscriptions or not entries:
                continue
            self.delivered[key] = entries[-1][0]
            first = _id(entries[0][0])
            for sub in list(self.subscriptions[key]):
                sub.deliver(entries, first)
            if len(entries) == READ_COUNT:  # more waiting
                self.dirty.add(key)
                self._dirty_event.set()

    async def _patrol(self) -> None:
        """Every SSE_SAFETY_POLL_SECONDS: read every followed key once, and close the
        streams of deleted projects."""
        while True:
            await asyncio.sleep(settings.SSE_SAFETY_POLL_SECONDS)
            try:
                keys = list(self.subscriptions)
                if keys:
                    self.dirty.update(keys)
                    self._dirty_event.set()
                await self._close_deleted()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.warning("event streams: patrol failed", exc_info=True)

    async def _beat(self) -> None:
        """Every half CHAT_HEARTBEAT_SECONDS: HEARTBEAT to the subscriptions that want it
        and were handed nothing since the time before (a beat counts as something), so
        none is quiet for longer than CHAT_HEARTBEAT_SECONDS and an idle one gets a beat
        that often."""
        while True:
            await asyncio.sleep(settings.CHAT_HEARTBEAT_SECONDS / 2)
            for subs in self.subscriptions.values():
                for sub in subs:
                    if sub.heartbeat and sub.quiet:
                        sub.inbox.put_nowait(HEARTBEAT)
                        sub.quiet = False
                    else:
                        sub.quiet = True

    async def _close_deleted(self) -> None:
        projects = {s.project_id for subs in self.subscriptions.values() for s in subs}
        if not projects:
            return
        ordered = list(projects)
        # Through the pipelined client, as the opens' checks: one round trip, and never a
        # second command at once on the broker's one connection (when it is another Redis).
        hits = await asyncio.gather(
            *(self.broker_pipelined.exists(tombstone_key(p)) for p in ordered)
        )
        gone = {p for p, hit in zip(ordered, hits, strict=True) if hit}
        for subs in list(self.subscriptions.values()):
            for sub in list(subs):
                if sub.project_id in gone:
                    sub.inbox.put_nowait(CLOSED)

    def stop_streams(self) -> int:
        """Hand every subscription STOPPING (and any made from now on); returns how
        many there were."""
        self.stopping = True
        subs = [sub for subs in self.subscriptions.values() for sub in subs]
        for sub in subs:
            sub.inbox.put_nowait(STOPPING)
        return len(subs)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task
        self._tasks = []
        with contextlib.suppress(Exception):
            await self.pubsub.aclose()
        await self.client.aclose()
        if self.broker is not self.client:
            await self.broker.aclose()


_hubs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def get_hub() -> StreamHub:
    """The hub of the running event loop."""
    loop = asyncio.get_running_loop()
    hub = _hubs.get(loop)
    if hub is None:
        hub = _hubs[loop] = StreamHub()
    return hub


async def stop_hub_streams() -> None:
    """End the running loop's event streams (the web process is stopping)."""
    hub = _hubs.get(asyncio.get_running_loop())
    if hub is not None:
        ended = hub.stop_streams()
        logger.info("event streams: %d told to reconnect elsewhere (stopping)", ended)


async def close_hub() -> None:
    """Close the running loop's hub (ASGI lifespan shutdown, tests)."""
    hub = _hubs.pop(asyncio.get_running_loop(), None)
    if hub is not None:
        await hub.close()
