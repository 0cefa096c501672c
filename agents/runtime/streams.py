"""Chat event streams, cancel flags, context jobs and request/reply, all in workspace Redis.

Every key here is workspace-relative and goes through `ScopedRedis`, so teardown's
`delete_all` removes it with the rest of the workspace:

- `stream:{session_id}`  a Redis Stream of chat events (the SSE endpoint reads it);
  entry fields `type` (message.created|delta|completed|error) and `data` (JSON).
- `cancel:{message_id}`  set while a run of that assistant message should stop.
- `context_job:{job_id}` a hash with the status of a context ingestion or clear job.
- `reply:{request_id}`   a one-entry stream a worker answers a waiting web request on.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from django.conf import settings

from workspaces.redis import ScopedRedis

MESSAGE_CREATED = "message.created"
MESSAGE_DELTA = "message.delta"
MESSAGE_COMPLETED = "message.completed"
MESSAGE_ERROR = "message.error"

# A session's stream outlives its last event by this long, then Redis drops it (the
# messages themselves are in the database).
STREAM_TTL_SECONDS = 7 * 24 * 3600
CANCEL_TTL_SECONDS = 3600
JOB_TTL_SECONDS = 24 * 3600
REPLY_TTL_SECONDS = 120


def stream_key(session_id: uuid.UUID | str) -> str:
    return f"stream:{uuid.UUID(str(session_id))}"


def encode_event(event_type: str, data: dict[str, Any]) -> dict[str, str]:
    return {"type": event_type, "data": json.dumps(data, separators=(",", ":"))}


def event_append(
    *, redis: ScopedRedis, session_id: uuid.UUID | str, event_type: str, data: dict[str, Any]
) -> str:
    """Append one event to a session's stream; returns its id (the SSE `id:`)."""
    return events_append(redis=redis, session_id=session_id, events=[(event_type, data)])[0]


def events_append(
    *,
    redis: ScopedRedis,
    session_id: uuid.UUID | str,
    events: list[tuple[str, dict[str, Any]]],
) -> list[str]:
    """Append events in order, in one round trip; returns their ids."""
    key = stream_key(session_id)
    pipe = redis.pipeline(transaction=False)
    for event_type, data in events:
        pipe.xadd(
            key,
            encode_event(event_type, data),
            maxlen=settings.CHAT_STREAM_MAXLEN,
            approximate=True,
        )
    pipe.expire(key, STREAM_TTL_SECONDS)
    return pipe.execute()[: len(events)]


def event_append_checking_cancel(
    *,
    redis: ScopedRedis,
    session_id: uuid.UUID | str,
    message_id: int,
    event_type: str,
    data: dict[str, Any],
) -> tuple[str, bool]:
    """Append an event and learn, in the same round trip, whether the run was cancelled."""
    pipe = redis.pipeline(transaction=False)
    pipe.xadd(
        stream_key(session_id),
        encode_event(event_type, data),
        maxlen=settings.CHAT_STREAM_MAXLEN,
        approximate=True,
    )
    pipe.exists(cancel_key(message_id))
    event_id, cancelled = pipe.execute()
    return event_id, bool(cancelled)


def stream_delete(*, redis: ScopedRedis, session_id: uuid.UUID | str) -> None:
    redis.delete(stream_key(session_id))


# --- Cancelling a run ------------------------------------------------------------------


def cancel_key(message_id: int) -> str:
    return f"cancel:{int(message_id)}"


def cancel_request(*, redis: ScopedRedis, message_ids: list[int]) -> None:
    if not message_ids:
        return
    pipe = redis.pipeline(transaction=False)
    for message_id in message_ids:
        pipe.set(cancel_key(message_id), "1", ex=CANCEL_TTL_SECONDS)
    pipe.execute()


def cancel_requested(*, redis: ScopedRedis, message_id: int) -> bool:
    return bool(redis.exists(cancel_key(message_id)))


# --- Context jobs ----------------------------------------------------------------------


def job_key(job_id: uuid.UUID | str) -> str:
    return f"context_job:{uuid.UUID(str(job_id))}"


def job_create(*, redis: ScopedRedis, job_id: uuid.UUID | str, fields: dict[str, Any]) -> None:
    key = job_key(job_id)
    pipe = redis.pipeline(transaction=True)
    pipe.hset(key, mapping={k: json.dumps(v) for k, v in fields.items()})
    pipe.expire(key, JOB_TTL_SECONDS)
    pipe.execute()


def job_update(*, redis: ScopedRedis, job_id: uuid.UUID | str, fields: dict[str, Any]) -> bool:
    """Update a job that still exists; a workspace torn down meanwhile stays empty."""
    key = job_key(job_id)
    if not redis.exists(key):
        return False
    redis.hset(key, mapping={k: json.dumps(v) for k, v in fields.items()})
    return True


def job_get(*, redis: ScopedRedis, job_id: uuid.UUID | str) -> dict[str, Any] | None:
    raw = redis.hgetall(job_key(job_id))
    if not raw:
        return None
    return {k: json.loads(v) for k, v in raw.items()}


# --- Request/reply between a web request and a worker -----------------------------------


def reply_key(request_id: uuid.UUID | str) -> str:
    return f"reply:{uuid.UUID(str(request_id))}"


def reply_send(*, redis: ScopedRedis, request_id: uuid.UUID | str, payload: dict) -> None:
    key = reply_key(request_id)
    pipe = redis.pipeline(transaction=True)
    pipe.xadd(key, {"data": json.dumps(payload)})
    pipe.expire(key, REPLY_TTL_SECONDS)
    pipe.execute()


def reply_wait(*, redis: ScopedRedis, request_id: uuid.UUID | str, timeout: float) -> dict | None:
    """Block until the worker answers (or `timeout` seconds pass: None)."""
    key = reply_key(request_id)
    try:
        answer = redis.xread({key: "0-0"}, count=1, block=max(1, int(timeout * 1000)))
    finally:
        redis.delete(key)
    if not answer:
        return None
    _stream, entries = answer[0]
    return json.loads(entries[0][1]["data"])
