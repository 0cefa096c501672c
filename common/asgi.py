"""Serving long-lived responses (event streams, requests waiting for a worker) under
ASGI without a thread each.

Django's ASGI handler runs every request inside a thread-sensitive context: the first
sync step of the request (any sync middleware, a `sync_to_async` call) gets a thread of
its own that lives as long as the response. For an event stream that is one idle thread
per open connection, for hours. `StreamingAwareASGIHandler` serves the views marked
`@long_lived` (for all methods, or only those named) outside that context, so their
short sync steps run on the event loop or a shared thread, and a waiting request costs
a coroutine only.

Every other request runs sync work on a thread of its own and, in it, holds a pooled
database connection. `Admission` bounds how many do at once (WEB_MAX_CONCURRENT_REQUESTS,
about the pool's size): the rest wait their turn as coroutines, holding no thread nor
connection, up to WEB_ADMISSION_WAIT_SECONDS (a request's body is read before its turn,
so a client that sends one slowly holds no slot), and at most WEB_ADMISSION_QUEUE of them;
past either bound a request answers 503 with Retry-After before anything ran, so a
burst is worked through at the database's pace instead of a thousand threads fighting
for ten connections and failing after the pool's timeout.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from asgiref.sync import SyncToAsync, ThreadSensitiveContext, sync_to_async
from django.conf import settings
from django.core import signals
from django.core.exceptions import RequestAborted
from django.core.handlers.asgi import ASGIHandler, get_script_prefix
from django.core.handlers.base import BaseHandler
from django.db import close_old_connections
from django.http import FileResponse
from django.urls import Resolver404, ResolverMatch, get_resolver, set_script_prefix

from .singletons import process_singleton

logger = logging.getLogger(__name__)

LONG_LIVED = "long_lived_response"
# Set while a `@long_lived` view is served outside the request thread context.
_OUTSIDE_REQUEST_THREAD = contextvars.ContextVar("outside_request_thread", default=False)


def long_lived(view: Callable[..., Any] | None = None, *, methods: Iterable[str] = ()):
    """Mark an async view whose response stays open or waits (Server-Sent Events, a
    request waiting for a worker): for every method, or only `methods`."""

    def mark(view: Callable[..., Any]) -> Callable[..., Any]:
        setattr(view, LONG_LIVED, frozenset(m.upper() for m in methods) or True)
        return view

    return mark(view) if view is not None else mark


def _route(scope: dict) -> ResolverMatch | None:
    """The URL pattern the request of this ASGI scope goes to, if any."""
    path = scope.get("path", "")
    prefix = get_script_prefix(scope).rstrip("/")
    if prefix and path.startswith(prefix):
        path = path[len(prefix) :]
    try:
        return get_resolver().resolve(path)
    except Resolver404:
        return None


def serves_long_lived(scope: dict) -> bool:
    """Whether the request of this ASGI scope goes to a `@long_lived` view."""
    if scope.get("type") != "http":
        return False
    match = _route(scope)
    if match is None:
        return False
    marked = getattr(match.func, LONG_LIVED, False)
    if isinstance(marked, frozenset):
        return scope.get("method", "GET").upper() in marked
    return bool(marked)


class SyncLanes:
    """The threads the sync steps of `@long_lived` requests run on (their middleware's
    hops and `run_sync`), one lane (a thread) per credential at a time.

    On one shared thread (asgiref's default) or one shared pool, a user's flood of
    searches or stream opens queues every other user's steps behind its own. Here a
    credential (its Authorization header, else its session cookie) keeps one lane while
    it has requests being set up, and a new credential takes the lane with the fewest
    credentials: a flood queues on its own lane, and another user's steps run on
    another, as long as no more credentials are busy at once than there are lanes.
    A credential with `per_credential` requests in this state already is refused
    (`enter` returns None): a 429, before anything ran.

    Used from one event loop's thread only (no lock)."""

    def __init__(self, *, count: int, per_credential: int) -> None:
        self.per_credential = per_credential
        self.contexts = [ThreadSensitiveContext() for _ in range(max(count, 1))]
        for n, context in enumerate(self.contexts):
            # Its executor, as `async with context` would register one, for good.
            SyncToAsync.context_to_thread_executor[context] = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix=f"waiting-lane-{n}"
            )
        self.credentials = [0] * len(self.contexts)  # credentials per lane
        self.busy: dict[str, list[int]] = {}  # credential -> [lane, requests]

    def enter(self, credential: str) -> Callable[[], None] | None:
        """Put this request on its credential's lane (the context's thread-sensitive
        steps run there): returns the call that takes it off, or None (refused)."""
        entry = self.busy.get(credential)
        if entry is None:
            lane = min(range(len(self.credentials)), key=self.credentials.__getitem__)
            self.credentials[lane] += 1
            entry = self.busy[credential] = [lane, 0]
        elif entry[1] >= self.per_credential:
            return None
        entry[1] += 1
        SyncToAsync.thread_sensitive_context.set(self.contexts[entry[0]])
        left = False

        def leave() -> None:
            nonlocal left
            if left:
                return
            left = True
            entry[1] -= 1
            if not entry[1]:
                del self.busy[credential]
                self.credentials[entry[0]] -= 1

        return leave

    def close(self) -> None:
        """Stop the lanes' threads once idle (a request still on one gets a new thread)."""
        for context in self.contexts:
            executor = SyncToAsync.context_to_thread_executor.pop(context, None)
            if executor is not None:
                executor.shutdown(wait=False)


@process_singleton(
    settings=("WEB_WAITING_SYNC_THREADS", "WEB_WAITING_PER_CREDENTIAL"), close=SyncLanes.close
)
def sync_lanes() -> SyncLanes:
    return SyncLanes(
        count=settings.WEB_WAITING_SYNC_THREADS,
        per_credential=settings.WEB_WAITING_PER_CREDENTIAL,
    )


def request_credential(scope: dict) -> str:
    """Who a request is, before anything checked it: its Authorization header, else its
    session cookie (raw: only compared, never stored)."""
    cookie = b""
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            return "a:" + value.decode("latin-1")
        if name == b"cookie":
            cookie = value
    if cookie:
        prefix = settings.SESSION_COOKIE_NAME.encode() + b"="
        for part in cookie.split(b";"):
            part = part.strip()
            if part.startswith(prefix):
                return "s:" + part[len(prefix) :].decode("latin-1")
    return ""


# The call that takes the request off its lane once its response exists (an event
# stream then streams without holding its credential's count).
_LANE_LEAVE: contextvars.ContextVar[Callable[[], None] | None] = contextvars.ContextVar(
    "lane_leave", default=None
)


async def run_sync(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """A sync step of a `@long_lived` view (authentication, reads). Served by this
    handler, it runs on its credential's lane (SyncLanes), as its middleware's steps do;
    elsewhere (the test client, WSGI) on the request's own thread. Either way it is
    `sync_to_async`'s thread-sensitive step: the lane is the request's context."""
    return await sync_to_async(function)(*args, **kwargs)


class Admission:
    """At most `limit` requests at once on one event loop; up to `queue` more wait, each
    at most `wait` seconds (FIFO: asyncio's semaphore wakes waiters in order). A request
    whose turn would come after `wait`, by the recent time a request holds its slot, is
    refused at once rather than after waiting for nothing."""

    # Weight of the newest hold time in the running mean.
    SMOOTHING = 0.05

    def __init__(self, *, limit: int, queue: int, wait: float) -> None:
        self.limit, self.queue, self.wait = limit, queue, wait
        self.semaphore = asyncio.Semaphore(limit)
        self.waiting = 0
        self.hold = 0.0  # running mean of how long a request holds its slot
        self._since: dict[int, float] = {}

    async def acquire(self) -> bool:
        """True with a slot held (release it), False when refused."""
        if not self.semaphore.locked() and not self.waiting:
            await self.semaphore.acquire()  # free: no wait
            return self._held()
        if self.waiting >= self.queue or (self.waiting + 1) * self.hold / self.limit > self.wait:
            return False
        self.waiting += 1
        try:
            async with asyncio.timeout(self.wait):
                await self.semaphore.acquire()
            return self._held()
        except TimeoutError:
            return False
        finally:
            self.waiting -= 1

    def _held(self) -> bool:
        task = asyncio.current_task()
        self._since[id(task)] = time.monotonic()
        return True

    def release(self) -> None:
        started = self._since.pop(id(asyncio.current_task()), None)
        if started is not None:
            held = time.monotonic() - started
            self.hold += self.SMOOTHING * (held - self.hold) if self.hold else held
        self.semaphore.release()


_admissions: dict[asyncio.AbstractEventLoop, Admission] = {}


def admission() -> Admission:
    """The running loop's admission (a semaphore belongs to one loop)."""
    loop = asyncio.get_running_loop()
    found = _admissions.get(loop)
    if found is None:
        for stale in [other for other in _admissions if other.is_closed()]:
            del _admissions[stale]
        found = _admissions[loop] = Admission(
            limit=settings.WEB_MAX_CONCURRENT_REQUESTS,
            queue=settings.WEB_ADMISSION_QUEUE,
            wait=settings.WEB_ADMISSION_WAIT_SECONDS,
        )
    return found


async def answer_busy(send, *, retry_after: int, status: int = 503) -> None:
    """A 503 in the API's error shape (common.api), straight on the ASGI channel; a 429
    when the cause is the client's own requests in flight."""
    if status == 429:
        detail = {"detail": "Too many of your requests are in flight here; retry shortly.",
                  "code": "throttled"}  # fmt: skip
    else:
        detail = {"detail": "This server is at capacity; retry shortly.",
                  "code": "backend_unavailable"}  # fmt: skip
    await _answer(send, status, detail, [(b"retry-after", str(retry_after).encode())])


async def _answer(send, status: int, detail: dict, headers: list[tuple[bytes, bytes]]) -> None:
    body = json.dumps(detail).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


# --- Request bodies ----------------------------------------------------------------------
#
# Django's ASGI handler reads a request's whole body (to a temporary file past
# FILE_UPLOAD_MAX_MEMORY_SIZE) before any view, parser or authentication runs, whatever
# its size: anyone who reaches the port could fill the disk with one request. Here a
# body is refused with a 413 past DATA_UPLOAD_MAX_MEMORY_SIZE, or past its view's own
# `max_body_bytes()` (an upload's): at once when its Content-Length says so, else as
# soon as that many bytes came. The view's limit is looked up only for a body past the
# first, so other requests pay nothing for it. A body none of which came for
# WEB_BODY_IDLE_SECONDS before its end is a 408: what was sent of it is let go.


# What a multipart body holds besides its file: boundaries, part headers, small fields.
UPLOAD_FRAMING_BYTES = 64 * 1024


class BodyRefused(Exception):
    """A request body refused while it was read (nothing was answered yet): the 413 or
    408 to answer, in the API's error shape, closing the connection."""

    def __init__(self, status: int, detail: str, code: str) -> None:
        super().__init__(detail)
        self.status, self.detail, self.code = status, detail, code

    @classmethod
    def too_large(cls, limit: int) -> BodyRefused:
        return cls(413, f"The request body is larger than {limit} bytes.", "payload_too_large")

    @classmethod
    def stalled(cls) -> BodyRefused:
        seconds = f"{settings.WEB_BODY_IDLE_SECONDS:g}"
        return cls(408, f"No part of the request body came for {seconds} seconds.",
                   "request_timeout")  # fmt: skip

    async def answer(self, send) -> None:
        detail = {"detail": self.detail, "code": self.code}
        await _answer(send, self.status, detail, [(b"connection", b"close")])


def body_max_bytes(scope: dict) -> int:
    """The most bytes the body of this request may hold: DATA_UPLOAD_MAX_MEMORY_SIZE, or
    its view's `max_body_bytes()` (a file's size) with room for the multipart framing."""
    match = _route(scope)
    view = getattr(match.func, "view_class", None) if match is not None else None
    own = getattr(view, "max_body_bytes", None)
    default = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    return max(own() + UPLOAD_FRAMING_BYTES, default) if own else default


def _declared_length(scope: dict) -> int:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return 0  # the server refuses it before the application sees it
    return 0


def _bounded(receive, scope: dict):
    """`receive`, raising BodyRefused once the body passes its limit, or when none of it
    came for WEB_BODY_IDLE_SECONDS before its end (a client that sends part of a body and
    stops would hold what it sent, up to the limit, for good)."""
    received, limit, ended = 0, None, False

    async def bounded():
        nonlocal received, limit, ended
        if ended:  # what follows the body: a disconnect, waited for as long as it takes
            return await receive()
        try:
            async with asyncio.timeout(settings.WEB_BODY_IDLE_SECONDS):
                message = await receive()
        except TimeoutError:
            raise BodyRefused.stalled() from None
        if message.get("type") != "http.request":
            ended = True
            return message
        ended = not message.get("more_body", False)
        received += len(message.get("body", b""))
        if received > settings.DATA_UPLOAD_MAX_MEMORY_SIZE:
            limit = body_max_bytes(scope) if limit is None else limit
            if received > limit:
                raise BodyRefused.too_large(limit)
        return message

    return bounded


@process_singleton(
    settings=("WEB_MAX_CONCURRENT_REQUESTS",), close=lambda pool: pool.shutdown(wait=False)
)
def _request_pool() -> ThreadPoolExecutor:
    # As many threads as admitted requests: an admitted request never waits for one.
    return ThreadPoolExecutor(
        max_workers=max(settings.WEB_MAX_CONCURRENT_REQUESTS, 1), thread_name_prefix="request"
    )


class StreamingAwareASGIHandler(ASGIHandler):
    """Two middleware chains over the same settings.MIDDLEWARE: the async one serves
    `@long_lived` views (every middleware runs async, so none of them waits on a
    thread); every other admitted request is served as WSGI serves it, in one step on
    one of a fixed set of threads (`serve_in_one_step`): the request's signals, the
    sync chain and the response's close, instead of a new thread per request and a hop
    to it and back for each of them."""

    def __init__(self) -> None:
        super().__init__()
        self._sync_handler = BaseHandler()
        self._sync_handler.load_middleware(is_async=False)

    async def serve_in_one_step(self, scope, body_file, send) -> None:
        loop = asyncio.get_running_loop()
        context = contextvars.copy_context()  # the trace's span, the script prefix
        response = await loop.run_in_executor(
            _request_pool(), context.run, self._respond, scope, body_file
        )
        try:
            await self.send_response(response, send)
        finally:
            if response.streaming:  # a file: closed once sent (its connections were)
                await sync_to_async(response.close)()

    def _respond(self, scope, body_file):
        """What WSGIHandler does, on this thread: the request's start, the response, and
        (unless it streams) its close, which hands the database connection back."""
        set_script_prefix(get_script_prefix(scope))
        signals.request_started.send(sender=self.__class__, scope=scope)
        request, response = self.create_request(scope, body_file)
        if request is not None:
            response = self._sync_handler.get_response(request)
            response._handler_class = self.__class__
            if isinstance(response, FileResponse):
                response.block_size = self.chunk_size
        if response.streaming:
            close_old_connections()  # what its close would do on this thread
        else:
            response.close()  # the body is in memory; request_finished runs here
        return response

    async def get_response_async(self, request):
        if _OUTSIDE_REQUEST_THREAD.get():
            try:
                return await super().get_response_async(request)
            finally:
                leave = _LANE_LEAVE.get()
                if leave is not None:
                    leave()  # the response exists: what is left is waiting or streaming
        return await sync_to_async(self._sync_handler.get_response, thread_sensitive=True)(request)

    async def __call__(self, scope, receive, send):
        if scope.get("type") == "http":
            declared = _declared_length(scope)
            if declared > settings.DATA_UPLOAD_MAX_MEMORY_SIZE:
                limit = body_max_bytes(scope)
                if declared > limit:
                    await BodyRefused.too_large(limit).answer(send)
                    return
            receive = _bounded(receive, scope)
        try:
            await self._serve(scope, receive, send)
        except BodyRefused as refused:  # raised while the body was read
            await refused.answer(send)

    async def _serve(self, scope, receive, send):
        if serves_long_lived(scope):
            leave = sync_lanes().enter(request_credential(scope))
            if leave is None:
                await answer_busy(
                    send, retry_after=settings.WEB_ADMISSION_RETRY_AFTER_SECONDS, status=429
                )
                return
            _OUTSIDE_REQUEST_THREAD.set(True)  # this request's context only
            _LANE_LEAVE.set(leave)
            try:
                await self.handle(scope, receive, send)
            finally:
                leave()
            return
        if scope.get("type") != "http" or settings.WEB_MAX_CONCURRENT_REQUESTS <= 0:
            await super().__call__(scope, receive, send)
            return
        # The body is read before the request takes its turn: a client that sends it
        # slowly holds a coroutine, not one of the few slots every request needs.
        try:
            body_file = await self.read_body(receive)
        except RequestAborted:
            return
        try:
            gate = admission()
            started = time.monotonic()
            if not await gate.acquire():
                logger.warning(
                    "%s %s: refused after %.1fs, %d requests waiting (capacity)",
                    scope.get("method"),
                    scope.get("path"),
                    time.monotonic() - started,
                    gate.waiting,
                )
                await answer_busy(send, retry_after=settings.WEB_ADMISSION_RETRY_AFTER_SECONDS)
                return
            try:
                await self.serve_in_one_step(scope, body_file, send)
            finally:
                gate.release()
        finally:
            body_file.close()
