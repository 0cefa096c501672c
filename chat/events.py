"""`GET /my/projects/{project_id}/chat/{session_id}/events/`: a chat session's events as
Server-Sent Events, served by an async view under ASGI.

Events come from the session's Redis Stream, so each carries the stream entry id as its
SSE `id:`; a client resuming with `Last-Event-ID` (or `?cursor=`) reads strictly after
it and gets every event it missed exactly once (as long as the stream still holds it:
settings.CHAT_STREAM_MAXLEN per session). Without a cursor a client gets the events
that arrive after it connected; `?cursor=0` replays what the stream holds.

Each wake-up (an event, or a quiet interval) is also when the stream notices that its
project was deleted and closes. A client that goes away cancels the generator at its
await point: its Redis connection goes back to the pool and the generator ends.
"""

from __future__ import annotations

import collections
import json
import logging
import re
import uuid

from django.conf import settings
from django.http import Http404, HttpRequest, JsonResponse, StreamingHttpResponse
from django.views.decorators.http import require_GET
from redis.exceptions import ResponseError
from rest_framework import exceptions
from rest_framework.settings import api_settings

from agentbus import project_gone_async
from common.api import error_body
from common.asgi import long_lived, run_sync
from realtime.auth import request_authorize
from realtime.streamhub import (
    CLOSED,
    HEARTBEAT,
    STOPPING,
    HubFull,
    StreamUnavailable,
    get_hub,
)
from workspaces.redis import ScopedRedis, scoped_async

from .selectors import session_exists_in
from .streams import stream_key

logger = logging.getLogger(__name__)

CURSOR_RE = re.compile(r"^\d{1,20}(-\d{1,20})?$")
MAX_ID_PART = 2**64 - 1

# What a stream's client is told when its web process stops (SIGTERM): the process is
# going, and the same request with Last-Event-ID goes on elsewhere.
STOPPING_REASON = "server stopping; reconnect"
# The event streams this process serves, per user (no one user may take the process's
# every stream: SSE_MAX_STREAMS_PER_USER).
_streams_by_user: collections.Counter[int] = collections.Counter()


def active_streams() -> int:
    """Event streams this process is serving right now."""
    return sum(_streams_by_user.values())


def _error(
    status: int, detail: str, fields: dict[str, list[str]] | None = None, **headers: str
) -> JsonResponse:
    """An error in the API's one shape (common.api.error_body)."""
    response = JsonResponse(error_body(status, detail, fields=fields), status=status)
    for name, value in headers.items():
        response[name] = value
    return response


def _authorize(request: HttpRequest, project_id: uuid.UUID, session_id: uuid.UUID) -> int:
    """The user id allowed to read this session's events, through the API's own
    authentication and project scoping (realtime.auth). Raises DRF's NotAuthenticated /
    AuthenticationFailed, or Http404; leaves no database connection open: a stream may
    last hours and must not hold one."""

    def reader(drf_request, projects) -> int:
        if not session_exists_in(projects=projects, session_id=session_id):
            raise Http404("No such chat session.")
        return drf_request.user.pk

    return request_authorize(request, project_id=project_id, then=reader)


async def _gone(project_id: uuid.UUID) -> bool:
    """The lifecycle guard, on the hub's connection to the broker (pipelined with the
    other streams opening)."""
    return await project_gone_async(project_id, client=get_hub().broker_pipelined)


@long_lived
@require_GET
async def session_events(request: HttpRequest, project_id: uuid.UUID, session_id: uuid.UUID):
    try:
        user_id = await run_sync(_authorize, request, project_id, session_id)
    except exceptions.APIException as exc:
        header = api_settings.DEFAULT_AUTHENTICATION_CLASSES[0]().authenticate_header(request)
        return _error(exc.status_code, str(exc.detail), **{"WWW-Authenticate": header})
    except Http404:
        return _error(404, "Not found.")
    if await _gone(project_id):
        return _error(404, "Not found.")
    hub = get_hub()
    if hub.count >= settings.SSE_MAX_STREAMS:
        return _error(
            503,
            "This server holds as many event streams as it may; retry shortly.",
            **{"Retry-After": str(settings.SSE_RETRY_AFTER_SECONDS)},
        )
    if _streams_by_user[user_id] >= settings.SSE_MAX_STREAMS_PER_USER:
        return _error(
            429,
            "You hold as many event streams on this server as one user may; close one "
            "or retry shortly.",
            **{"Retry-After": str(settings.SSE_RETRY_AFTER_SECONDS)},
        )

    cursor = request.headers.get("Last-Event-ID") or request.GET.get("cursor")
    if cursor is not None:
        cursor = cursor.strip()
        # Both parts of a stream id are 64-bit: a larger one would kill the stream later.
        if not CURSOR_RE.match(cursor) or max(_id(cursor)) > MAX_ID_PART:
            message = "Must be an event id like 1700000000000-0 (each part below 2**64)."
            field = "Last-Event-ID" if request.headers.get("Last-Event-ID") else "cursor"
            return _error(400, f"Invalid {field}: {message}", fields={field: [message]})
        if "-" not in cursor:
            cursor += "-0"
    redis = scoped_async(hub.pipelined, user_id, project_id)
    key = redis.key(stream_key(session_id))
    truncated_at = None
    if cursor is None:
        # Pin "now" to a concrete id, so nothing between two reads can be skipped.
        last = await hub.pipelined.xrevrange(key, count=1)
        cursor = last[0][0] if last else "0-0"
    else:
        truncated_at = await _trimmed_after(redis, stream_key(session_id), cursor)

    response = EventStreamResponse(
        _event_stream(
            key=key,
            cursor=cursor,
            project_id=project_id,
            user_id=user_id,
            truncated_at=truncated_at,
        ),  # fmt: skip
        content_type="text/event-stream",
    )
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"  # nginx: pass events through as they come
    return response


class EventStreamResponse(StreamingHttpResponse):
    """Served from the event generator itself: its parts are bytes already, so not
    through the two generators Django wraps around an async iterator (one converting
    parts to bytes, one mapping a sync iterator), which every event paid for per stream."""

    def __aiter__(self):
        return self._iterator


def _id(value: str) -> tuple[int, int]:
    ms, _, seq = value.partition("-")
    return int(ms), int(seq or 0)


async def _trimmed_after(redis: ScopedRedis, key: str, cursor: str) -> str | None:
    """The stream's first id if events after `cursor` may have been trimmed away
    (settings.CHAT_STREAM_MAXLEN): the client is told, and reloads the messages."""
    try:
        info = await redis.xinfo_stream(key)
    except ResponseError:  # no stream (yet): nothing was trimmed
        return None
    first = info.get("first-entry")
    if not first or info.get("entries-added", 0) <= info.get("length", 0):
        return None
    return first[0] if _id(cursor) < _id(first[0]) else None


_last_encoded: tuple[list, bytes] | None = None


def _encoded(entries: list) -> bytes:
    """The SSE text of `entries`. One read of the hub hands the same list to every
    stream of its key, and they run one after another: it is encoded once for them."""
    global _last_encoded
    last = _last_encoded
    if last is not None and last[0] is entries:
        return last[1]
    data = "".join(format_event(eid, fields) for eid, fields in entries).encode()
    _last_encoded = (entries, data)
    return data


def format_event(event_id: str, fields: dict[str, str]) -> str:
    data = fields.get("data", "{}")
    return f"id: {event_id}\nevent: {fields.get('type', 'message')}\ndata: {data}\n\n"


async def _event_stream(
    *,
    key: str,
    cursor: str,
    project_id: uuid.UUID,
    user_id: int,
    truncated_at: str | None = None,
):
    """The stream's events after `cursor`, from the process's hub (no connection of its
    own), a heartbeat when quiet, and `stream.closed` when the project is deleted or the
    process is stopping."""
    _streams_by_user[user_id] += 1
    try:
        async with get_hub().subscribe(
            key=key, project_id=project_id, cursor=cursor, heartbeat=True
        ) as sub:
            yield f"retry: 2000\n: connected at {cursor}\n\n".encode()
            if truncated_at is not None:
                notice = json.dumps(
                    {"first_id": truncated_at, "reason": "older events were trimmed"}
                )
                yield f"event: stream.truncated\ndata: {notice}\n\n".encode()
            while True:
                entries = await sub.inbox.get()
                if entries == HEARTBEAT:
                    yield b": heartbeat\n\n"
                    continue
                if entries in (CLOSED, STOPPING):
                    reason = "project deleted" if entries == CLOSED else STOPPING_REASON
                    closing = json.dumps({"reason": reason})
                    yield f"event: stream.closed\ndata: {closing}\n\n".encode()
                    return
                yield _encoded(entries)
    except HubFull:
        closing = json.dumps({"reason": "too many streams; reconnect"})
        yield f"event: stream.closed\ndata: {closing}\n\n".encode()
    except StreamUnavailable:
        closing = json.dumps({"reason": "events unavailable; reconnect"})
        yield f"event: stream.closed\ndata: {closing}\n\n".encode()
    finally:
        _streams_by_user[user_id] -= 1
        if not _streams_by_user[user_id]:
            del _streams_by_user[user_id]
