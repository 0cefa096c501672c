"""Chat event streams, cancel flags and the runs waiting for a worker, in workspace Redis.

Every key here is workspace-relative and goes through `ScopedRedis`, so teardown's
`delete_all` removes it with the rest of the workspace:

- `stream:{session_id}`  a Redis Stream of chat events (the SSE endpoint reads it);
  entry fields `type` (EVENT_TYPES) and `data` (JSON).
- `cancel:{message_id}`  set while a run of that assistant message should stop.
- `runs:dispatched`      a hash of the runs whose task waits for a worker: "" while on
  the project's queue, then the id of the worker that received it, removed when the
  run starts. The recovery pass dispatches again a queued run that is not here (its
  message was lost), whose worker is gone, or whose task is not on an empty queue.

Context jobs' records are context.job_records'; request/reply is realtime.replies'.
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
MESSAGE_CANCELLED = "message.cancelled"
# A run starts over (its worker was lost): what the client has of the answer so far is
# replaced by the deltas that follow (they start again at offset 0).
MESSAGE_RESTARTED = "message.restarted"
# A run's tool loop (chat.toolloop): each time it asks the model, each tool call it
# makes (its arguments), and each call's result (cut to TOOL_EVENT_MAX_CHARS).
RUN_STEP = "run.step"
# A run stored to wait (a tool call's approval, the agents it asked), and resumed.
RUN_WAITING = "run.waiting"
RUN_RESUMED = "run.resumed"
TOOL_CALL = "tool.call"
TOOL_RESULT = "tool.result"
# The agent changed one of its memory blocks (memory_append, memory_replace).
MEMORY_UPDATED = "memory.updated"

# A session's stream outlives its last event by this long, then Redis drops it (the
# messages themselves are in the database).
STREAM_TTL_SECONDS = 7 * 24 * 3600
CANCEL_TTL_SECONDS = 3600


def message_event_data(message) -> dict[str, Any]:
    """A message (chat.models.Message) as events and the API show it."""
    return {
        "id": message.id,
        "session_id": str(message.session_id),
        "role": message.role,
        "content": message.content,
        "status": message.status,
        "error": message.error,
        "citations": message.citations or [],
        "created_at": message.created_at.isoformat() if message.created_at else None,
    }


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
    runs_dispatched: list[str] | None = None,
) -> list[str]:
    """Append events in order, in one round trip; returns their ids. Readers waiting on
    the stream are told on the channel of the same name (realtime.streamhub).
    `runs_dispatched`: marked as runs_mark_dispatched does, in the same round trip."""
    key = stream_key(session_id)
    pipe = redis.pipeline(transaction=False)
    if runs_dispatched:
        pipe.hset(RUNS_DISPATCHED_KEY, mapping=dict.fromkeys(runs_dispatched, ""))
        events_at = 1
    else:
        events_at = 0
    for event_type, data in events:
        pipe.xadd(
            key,
            encode_event(event_type, data),
            maxlen=settings.CHAT_STREAM_MAXLEN,
            approximate=True,
        )
    pipe.expire(key, STREAM_TTL_SECONDS)
    pipe.publish(key, "")
    return pipe.execute()[events_at : events_at + len(events)]


# Append unless the run was cancelled, atomically: no delta follows a cancel. Readers
# are told on the stream's channel. KEYS: stream, cancel flag. ARGV: maxlen, type, data.
# Returns the id, or false.
_APPEND_UNLESS_CANCELLED = """
if redis.call('EXISTS', KEYS[2]) == 1 then return false end
local id = redis.call(
  'XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'type', ARGV[2], 'data', ARGV[3])
redis.call('PUBLISH', KEYS[1], '')
return id
"""


def event_append_unless_cancelled(
    *,
    redis: ScopedRedis,
    session_id: uuid.UUID | str,
    message_id: int,
    event_type: str,
    data: dict[str, Any],
) -> str | None:
    """Append an event of a run unless the run was cancelled; None when it was."""
    fields = encode_event(event_type, data)
    event_id = redis.script(
        _APPEND_UNLESS_CANCELLED,
        keys=[stream_key(session_id), cancel_key(message_id)],
        args=[settings.CHAT_STREAM_MAXLEN, fields["type"], fields["data"]],
    )
    return event_id or None


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


# --- Runs on the queue ---------------------------------------------------------------

RUNS_DISPATCHED_KEY = "runs:dispatched"

# Reserved by the worker that received the task, only while the run is still marked
# dispatched (the run may have started and unmarked itself already).
_RESERVE = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
end
"""


def runs_mark_dispatched(*, redis: ScopedRedis, run_ids: list[str]) -> None:
    """The runs' tasks are (about to be) on the project's queue."""
    if run_ids:
        redis.hset(RUNS_DISPATCHED_KEY, mapping=dict.fromkeys(run_ids, ""))


def runs_mark_reserved(*, redis: ScopedRedis, run_id: str, worker: str) -> None:
    """The run's task left the queue for `worker` (agentbus.worker_identity)."""
    redis.script(_RESERVE, keys=[RUNS_DISPATCHED_KEY], args=[run_id, worker])


def runs_unmark(*, redis: ScopedRedis, run_ids: list[str]) -> None:
    """The runs started (or their dispatch failed): no longer waiting for a worker."""
    if run_ids:
        redis.hdel(RUNS_DISPATCHED_KEY, *run_ids)


def runs_marks(*, redis: ScopedRedis, run_ids: list[str]) -> dict[str, str | None]:
    """Per run: None (not marked: its task was lost), "" (on the queue) or the worker
    holding its task."""
    if not run_ids:
        return {}
    return dict(zip(run_ids, redis.hmget(RUNS_DISPATCHED_KEY, run_ids), strict=True))
