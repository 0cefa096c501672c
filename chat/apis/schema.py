"""What drf-spectacular cannot see for itself in the agents' API (settings'
SPECTACULAR_SETTINGS["POSTPROCESSING_HOOKS"]):

- the chat event stream: a plain async view (chat.events) serving Server-Sent Events,
  described here as it behaves: media type, event types and their data, resuming;
- OpenAPI links from each created object to the operations on it, so a client (and the
  contract tests' stateful phase) can follow project -> agent -> session -> message.
"""

from __future__ import annotations

from django.conf import settings

from .. import streams

EVENTS_PATH = "/my/projects/{project_id}/chat/{session_id}/events/"
CURSOR_PATTERN = r"^\d{1,19}(-\d{1,19})?$"

_MESSAGE_ID = {"type": "integer", "description": "The assistant (or user) message's id."}

# Each event type's `data` (JSON), as chat.state, chat.engine, chat.toolloop and
# chat.dispatch write it.
EVENT_DATA = {
    streams.MESSAGE_CREATED: (
        "A message was stored: the user's, and the pending assistant message that will answer it.",
        {"$ref": "#/components/schemas/Message"},
    ),
    streams.MESSAGE_DELTA: (
        "The next piece of an answer; `offset` is where it starts in the answer's text.",
        {
            "type": "object",
            "required": ["message_id", "delta", "offset"],
            "properties": {
                "message_id": _MESSAGE_ID,
                "delta": {"type": "string"},
                "offset": {"type": "integer", "minimum": 0},
            },
        },
    ),
    streams.MESSAGE_COMPLETED: (
        "The answer is complete: its whole text.",
        {
            "type": "object",
            "required": ["message_id", "content", "status"],
            "properties": {
                "message_id": _MESSAGE_ID,
                "content": {"type": "string"},
                "status": {"type": "string", "enum": ["done"]},
                "citations": {
                    "type": "array",
                    "description": "The chunks the answer drew on (as the message's `citations`).",
                    "items": {"type": "object", "additionalProperties": True},
                },
            },
        },
    ),
    streams.MESSAGE_ERROR: (
        "The answer ended in error: why, and what text it had.",
        {
            "type": "object",
            "required": ["message_id", "error"],
            "properties": {
                "message_id": _MESSAGE_ID,
                "error": {"type": "string"},
                "content": {"type": "string"},
            },
        },
    ),
    streams.MESSAGE_CANCELLED: (
        "The answer was cancelled (…/cancel/); no delta of it follows.",
        {"type": "object", "required": ["message_id"], "properties": {"message_id": _MESSAGE_ID}},
    ),
    streams.MESSAGE_RESTARTED: (
        "The answer starts over (its worker was lost): drop what you have of it; the "
        "deltas that follow start again at offset 0.",
        {
            "type": "object",
            "required": ["message_id", "attempt"],
            "properties": {"message_id": _MESSAGE_ID, "attempt": {"type": "integer"}},
        },
    ),
    streams.RUN_STEP: (
        "The run asks the model (step 1, 2, …; at most the agent's `max_steps`).",
        {
            "type": "object",
            "required": ["message_id", "run_id", "step"],
            "properties": {
                "message_id": _MESSAGE_ID,
                "run_id": {"type": "string", "format": "uuid"},
                "step": {"type": "integer"},
            },
        },
    ),
    streams.TOOL_CALL: (
        "The model called a tool: its name and arguments (JSON text, cut to "
        "TOOL_EVENT_MAX_CHARS). Calls of one step run in parallel.",
        {
            "type": "object",
            "required": ["message_id", "run_id", "step", "call_id", "name", "arguments"],
            "properties": {
                "message_id": _MESSAGE_ID,
                "run_id": {"type": "string", "format": "uuid"},
                "step": {"type": "integer"},
                "call_id": {"type": "string"},
                "name": {"type": "string"},
                "arguments": {"type": "string"},
                "approval": {
                    "type": "boolean",
                    "description": "The call waits for the owner's approval "
                    "(`run.waiting` follows).",
                },
            },
        },
    ),
    streams.RUN_WAITING: (
        "The run is stored, holding no worker: `reason` `approval` (the calls marked "
        "`requires_approval` wait for POST …/runs/{run_id}/approve/ or /reject/) or "
        "`agents` (the agents it asked are answering). Arguments are scrubbed of the "
        "project's secrets. Past `waiting_until` the run ends in error.",
        {
            "type": "object",
            "required": ["message_id", "run_id", "reason", "step", "calls", "waiting_until"],
            "properties": {
                "message_id": _MESSAGE_ID,
                "run_id": {"type": "string", "format": "uuid"},
                "reason": {"type": "string", "enum": ["approval", "agents"]},
                "step": {"type": "integer"},
                "waiting_until": {"type": "string", "format": "date-time"},
                "calls": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["call_id", "name", "arguments", "requires_approval"],
                        "properties": {
                            "call_id": {"type": "string"},
                            "name": {"type": "string"},
                            "arguments": {"type": "string"},
                            "requires_approval": {"type": "boolean"},
                            "child_run_id": {"type": "string", "format": "uuid"},
                        },
                    },
                },
            },
        },
    ),
    streams.RUN_RESUMED: (
        "A waiting run goes on, on any worker: `why` `approved`, `rejected` or "
        "`answered` (every agent it asked ended).",
        {
            "type": "object",
            "required": ["message_id", "run_id", "why"],
            "properties": {
                "message_id": _MESSAGE_ID,
                "run_id": {"type": "string", "format": "uuid"},
                "why": {"type": "string", "enum": ["approved", "rejected", "answered"]},
            },
        },
    ),
    streams.TOOL_RESULT: (
        "A tool call ended: `ok` and its result (cut to TOOL_EVENT_MAX_CHARS; the "
        "project's secrets never appear in it).",
        {
            "type": "object",
            "required": ["message_id", "run_id", "step", "call_id", "name", "ok", "result"],
            "properties": {
                "message_id": _MESSAGE_ID,
                "run_id": {"type": "string", "format": "uuid"},
                "step": {"type": "integer"},
                "call_id": {"type": "string"},
                "name": {"type": "string"},
                "ok": {"type": "boolean"},
                "result": {"type": "string"},
                "truncated": {"type": "boolean"},
                "child_run_id": {
                    "type": "string",
                    "format": "uuid",
                    "description": "Agent tools: the run of the agent asked (its events "
                    "are on its own session's stream, `child_session_id`).",
                },
                "child_session_id": {"type": "string", "format": "uuid"},
            },
        },
    ),
    streams.MEMORY_UPDATED: (
        "The agent changed one of its memory blocks (memory_append, memory_replace): "
        "the block's label, the action, its length and limit in characters.",
        {
            "type": "object",
            "required": ["message_id", "run_id", "label", "action", "chars", "limit"],
            "properties": {
                "message_id": _MESSAGE_ID,
                "run_id": {"type": "string", "format": "uuid"},
                "label": {"type": "string"},
                "action": {"type": "string", "enum": ["append", "replace"]},
                "chars": {"type": "integer"},
                "limit": {"type": "integer"},
            },
        },
    ),
    "stream.truncated": (
        "Events after your resume point were trimmed away (CHAT_STREAM_MAXLEN per "
        "session): reload the messages. Sent first, without an `id:`.",
        {
            "type": "object",
            "required": ["first_id", "reason"],
            "properties": {"first_id": {"type": "string"}, "reason": {"type": "string"}},
        },
    ),
    "stream.closed": (
        "The stream ends: the project was deleted (`reason`: `project deleted`), this "
        "server is stopping (`server stopping; reconnect`: reconnect with "
        "`Last-Event-ID`), serves too many streams (`too many streams; reconnect`) or "
        "could not reach Redis as the stream opened (`events unavailable; reconnect`). "
        "Sent without an `id:`.",
        {"type": "object", "required": ["reason"], "properties": {"reason": {"type": "string"}}},
    ),
}


def _component_name(event_type: str) -> str:
    return "".join(part.title() for part in event_type.split(".")) + "Event"


def _events_description() -> str:
    rows = "\n".join(
        f"| `{event}` | {text} | `{_component_name(event)}` |"
        for event, (text, _schema) in EVENT_DATA.items()
    )
    heartbeat = settings.CHAT_HEARTBEAT_SECONDS
    return (
        "A `text/event-stream` of the session's events, as they happen. Each event has "
        "an `id:` (a stream id such as `1700000000000-0`), an `event:` type and a JSON "
        "`data:` line.\n\n"
        "**Resume** with the last id you got, as the `Last-Event-ID` header (browsers' "
        "EventSource sends it on reconnect) or as `?cursor=`: you get every event after "
        "it exactly once, as long as the stream still holds it. Without either you get "
        "the events from now on: open the stream *before* posting a message, or read "
        "with `?cursor=0`, which replays all the stream holds.\n\n"
        f"A comment line (`: heartbeat`) goes out after {heartbeat:g} s without events, so "
        "proxies keep the connection open. The stream does not end by itself: close it "
        "when you have what you need (it ends with `stream.closed` if the project is "
        "deleted or the server stops).\n\n"
        "| event | meaning | `data` schema |\n|---|---|---|\n" + rows
    )


def _parameter(name: str, where: str, schema: dict, description: str) -> dict:
    return {"name": name, "in": where, "required": where == "path", "schema": schema,
            "description": description}  # fmt: skip


def postprocess_event_stream(result, generator, request, public):
    """Add the chat event stream (not a DRF view, so not in the generated schema)."""
    schemas = result.setdefault("components", {}).setdefault("schemas", {})
    for event, (text, schema) in EVENT_DATA.items():
        schemas[_component_name(event)] = {**schema, "description": f"`{event}`: {text}"}
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    cursor = {"type": "string", "pattern": CURSOR_PATTERN, "example": "0"}
    sessions = result["paths"].get("/my/projects/{project_id}/chat/{session_id}/", {})
    security = sessions.get("get", {}).get("security", [])
    result["paths"][EVENTS_PATH] = {
        "get": {
            "operationId": "sessions_events",
            "summary": "Follow a session's events (Server-Sent Events)",
            "description": _events_description(),
            "tags": ["Chat"],
            "parameters": [
                _parameter("project_id", "path", {"type": "string", "format": "uuid"}, ""),
                _parameter("session_id", "path", {"type": "string", "format": "uuid"}, ""),
                _parameter(
                    "cursor", "query", cursor, "Resume after this event id; `0`: from the start."
                ),
                _parameter(
                    "Last-Event-ID", "header", cursor, "Resume after this event id (as `cursor`)."
                ),
            ],
            "security": security,
            "responses": {
                "200": {
                    "description": "The event stream (it stays open).",
                    "content": {
                        "text/event-stream": {
                            "schema": {
                                "type": "string",
                                "description": "Server-Sent Events: `id:`, `event:` (see the "
                                "table above) and `data:` (JSON) lines, a blank line after "
                                "each event.",
                            },
                            "example": 'id: 1700000000000-0\nevent: message.delta\ndata: {"message_id": 2, "delta": "Hel", "offset": 0}\n\n',  # noqa: E501
                        }
                    },
                },
                "400": {
                    "description": "`cursor` or `Last-Event-ID` is not an event id.",
                    "content": error,
                },  # fmt: skip
                "401": {"description": "No credentials, or invalid ones.", "content": error},
                "404": {"description": "No such session for this user.", "content": error},
                "429": {
                    "description": "The caller holds `SSE_MAX_STREAMS_PER_USER` streams on "
                    "this server already (`Retry-After` says when to try again).",
                    "content": error,
                },
                "503": {
                    "description": "This server holds `SSE_MAX_STREAMS` streams already "
                    "(`Retry-After` says when to try again).",
                    "content": error,
                },
            },
        }
    }
    return result


# (operation, status) -> {link name: (target operation, parameters, request body)}
_FROM_PROJECT = {"project_id": "$response.body#/id"}
_IN_PROJECT = {"project_id": "$request.path.project_id"}
_FROM_AGENT = {**_IN_PROJECT, "agent_id": "$response.body#/id"}
_FROM_SESSION = {**_IN_PROJECT, "session_id": "$response.body#/id"}
_FROM_JOB = {
    **_IN_PROJECT,
    "agent_id": "$request.path.agent_id",
    "job_id": "$response.body#/job_id",
}
LINKS = {
    ("projects_create", "201"): {
        "GetProject": ("projects_retrieve", _FROM_PROJECT, None),
        "UpdateProject": ("projects_update", _FROM_PROJECT, None),
        "DeleteProject": ("projects_destroy", _FROM_PROJECT, None),
        "CreateAgent": ("agents_create", _FROM_PROJECT, None),
        "ListAgents": ("agents_list", _FROM_PROJECT, None),
        "ListSessions": ("sessions_list", _FROM_PROJECT, None),
    },
    ("agents_create", "201"): {
        "GetAgent": ("agents_retrieve", _FROM_AGENT, None),
        "UpdateAgent": ("agents_update", _FROM_AGENT, None),
        "DeleteAgent": ("agents_destroy", _FROM_AGENT, None),
        "AddContext": ("context_add", _FROM_AGENT, None),
        "SearchContext": ("context_search", _FROM_AGENT, None),
        "ClearContext": ("context_clear", _FROM_AGENT, None),
        "CreateSession": ("sessions_create", _IN_PROJECT, {"agent_id": "$response.body#/id"}),
    },
    ("sessions_create", "201"): {
        "GetSession": ("sessions_retrieve", _FROM_SESSION, None),
        "DeleteSession": ("sessions_destroy", _FROM_SESSION, None),
        "SendMessage": ("messages_create", _FROM_SESSION, None),
        "ListMessages": ("messages_list", _FROM_SESSION, None),
        "CancelAnswers": ("sessions_cancel", _FROM_SESSION, None),
    },
    ("context_add", "202"): {"GetJob": ("context_job_retrieve", _FROM_JOB, None)},
    ("context_clear", "202"): {"GetJob": ("context_job_retrieve", _FROM_JOB, None)},
}


def postprocess_links(result, generator, request, public):
    """OpenAPI links from each created object to the operations on it."""
    operations = {
        op["operationId"]: op
        for path in result["paths"].values()
        for op in path.values()
        if isinstance(op, dict) and "operationId" in op
    }
    for (source, status), links in LINKS.items():
        response = operations.get(source, {}).get("responses", {}).get(status)
        if response is None:
            continue
        response["links"] = {}
        for name, (target, parameters, body) in links.items():
            if target not in operations:
                continue
            link = {"operationId": target, "parameters": dict(parameters)}
            if body is not None:
                link["requestBody"] = body
            response["links"][name] = link
    return result
