"""Agent tools (the `agent` tool kind, registered with tools.registry): an agent's run
asks another agent of its project over the project's bus. The callee answers in a chat
session of its own (its messages, its events), as a run whose `parent` is the caller's
run, dispatched on the same project's queue like any answer; the caller's tool call
waits for that answer on the callee session's event stream.

Limits: a tree of calls is at most AGENT_CALL_MAX_DEPTH deep, a run makes at most
AGENT_CALL_MAX_FANOUT calls, and a call waits at most AGENT_CALL_TIMEOUT_SECONDS.
Cancelling a run cancels its tree (chat.dispatch); a deleted project stops every run of
it; the callee is looked up in the caller's project only.

With AGENT_CALLS_SUSPEND (the default) the tool loop does not come here: it starts the
callee (chat.suspend.agent_call_start) and the caller is stored until the callee ends,
holding no slot. This executor is the path with it off: the caller's thread waits, and a
chain of calls n deep holds n + 1 slots of the pool at once.
"""

from __future__ import annotations

import json
import time
from typing import Any

from django.conf import settings
from django.db import connection

from agentbus import project_gone
from tools.http import ToolError
from workspaces.redis import scoped

from . import streams
from .dispatch import run_cancel
from .models import Message, Run
from .services import AgentCallRefused, agent_call_start

_ENDS = (streams.MESSAGE_COMPLETED, streams.MESSAGE_ERROR, streams.MESSAGE_CANCELLED)
# How often the wait also reads the callee's run from the database, in case its end
# event was lost (Redis restarted).
DB_CHECK_SECONDS = 2.0


def agent_call(*, spec, arguments: dict[str, Any], scope) -> tuple[bool, str, dict[str, Any]]:
    """Ask the tool's agent the model's message; returns (ok, its answer or the error,
    the call's links)."""
    target_agent_id, message = spec.target_agent_id, arguments["message"]

    try:
        child = agent_call_start(
            parent_run_id=scope.run_id, target_agent_id=target_agent_id, content=message
        )
    except AgentCallRefused as exc:
        raise ToolError(str(exc)) from None
    finally:
        connection.close()  # this tool thread's own connection
    links = {"child_run_id": str(child.id), "child_session_id": str(child.session_id)}
    try:
        ok, content = _wait(scope=scope, child=child)
    finally:
        connection.close()
    return ok, content, links


def _wait(*, scope, child) -> tuple[bool, str]:

    redis = scoped(scope.user_id, scope.project_id)
    key = streams.stream_key(child.session_id)
    last = "0-0"
    deadline = time.monotonic() + settings.AGENT_CALL_TIMEOUT_SECONDS
    next_db_check = time.monotonic() + DB_CHECK_SECONDS
    while True:
        if scope.should_stop() or time.monotonic() > deadline:
            if project_gone(scope.project_id):
                raise ToolError("the project was deleted")
            run_cancel(run=Run.objects.select_related("session__project").get(id=child.id))
            if time.monotonic() > deadline:
                raise ToolError(
                    f"the agent did not answer within {settings.AGENT_CALL_TIMEOUT_SECONDS:g}s"
                )
            raise ToolError("the calling run stopped")
        for _stream, entries in redis.xread({key: last}, block=250, count=100) or ():
            for event_id, fields in entries:
                last = event_id
                data = json.loads(fields["data"])
                if data.get("message_id") != child.message_id or fields["type"] not in _ENDS:
                    continue
                return _ended(fields["type"], data)
        if time.monotonic() >= next_db_check:
            next_db_check = time.monotonic() + DB_CHECK_SECONDS
            ended = Run.objects.filter(id=child.id, status__in=Run.FINISHED).first()
            connection.close()
            if ended is not None:
                answer = Message.objects.filter(id=child.message_id).first()
                connection.close()
                kind = {
                    Run.Status.DONE: streams.MESSAGE_COMPLETED,
                    Run.Status.ERROR: streams.MESSAGE_ERROR,
                    Run.Status.CANCELLED: streams.MESSAGE_CANCELLED,
                }[ended.status]
                content = answer.content if answer else ""
                return _ended(kind, {"content": content, "error": ended.error})


def _ended(kind: str, data: dict) -> tuple[bool, str]:
    if kind == streams.MESSAGE_COMPLETED:
        return True, data.get("content") or ""
    if kind == streams.MESSAGE_ERROR:
        return False, f"error: the agent's answer failed: {data.get('error', '')}"
    return False, "error: the agent's run was cancelled"
