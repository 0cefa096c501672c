"""One answer as a loop of provider calls and tool calls, on a worker (`ToolLoop`).

The model is asked with the agent's tools; the calls it asks for run (in parallel when
it asks for several); their results go back to it; until it answers without calling a
tool or the run reaches its step limit. Each step is an event on the session's stream
and an entry of `Run.steps`, written before the calls run and again when they ended, so
a run restarted after its worker died knows which calls may have taken effect
(chat.engine refuses to repeat the unsafe ones).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

from django.conf import settings
from django.db import connection
from django.utils import timezone

from common.tracing import in_context, span
from governance.usage import usage_meter_add
from llm.providers import ChatRequest, OfflineProvider, ToolCallRequest, get_provider
from tools.runner import ToolOutcome, ToolScope, ToolSpec, scrub, tool_execute
from workspaces.redis import ScopedRedis

from . import state, streams
from .coalesce import DeltasStopped, coalesced
from .models import Run


@dataclass
class Usage:
    """What the run's provider calls used so far (governance's meter, summed over them);
    read when the run's attempt is recorded and when it ends."""

    meter: Any = None
    # When the run's first text delta went out (time to first token, for the dashboards).
    first_token_at: Any = None


def release_database() -> None:
    """Hand this thread's database connection back to the pool before a wait (an
    embedding, the provider): with many runs per process, a run that sits on a
    connection while it waits starves the others."""
    if not connection.in_atomic_block:
        connection.close()


def shorten_raw(text: str, limit: int) -> str:
    """`text` cut to `limit` characters (whitespace kept, unlike `shorten`)."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


class ToolLoop:
    """Outcomes of `run`: done, cancelled, stopped, step-limit."""

    def __init__(
        self,
        *,
        redis: ScopedRedis,
        run: Run,
        tools: list[ToolSpec],
        scope: ToolScope,
        max_steps: int,
        stop: Callable[[], bool],
        usage: Usage,
        llm=None,
    ) -> None:
        self.redis, self.run_, self.scope, self.stop, self.llm = redis, run, scope, stop, llm
        self.usage = usage
        self.tools = {tool.name: tool for tool in tools}
        self.max_steps = max_steps
        self.steps: list[dict[str, Any]] = list(run.steps or [])

    def run(self, *, request: ChatRequest, parts: list[str]) -> str:
        for step in range(1, self.max_steps + 1):
            if step > 1 and self.stop():
                return "stopped"
            # Without tools an answer is one step: no step events.
            if self.tools and not self._event(streams.RUN_STEP, {"step": step}):
                return "cancelled"
            calls: list[ToolCallRequest] = []
            before = len(parts)
            outcome = self._ask(request=request, parts=parts, calls=calls)
            if outcome != "done":
                return outcome
            if not calls:
                return "done"
            if step == self.max_steps:
                return "step-limit"
            if self.stop():
                return "stopped"
            results = self._call(step=step, calls=calls)
            if isinstance(results, str):
                return results
            request = with_results(
                request, said="".join(parts[before:]), calls=calls, results=results
            )
        return "step-limit"

    def _ask(self, *, request: ChatRequest, parts: list[str], calls: list[ToolCallRequest]) -> str:
        """One provider call, its text streamed as deltas (`llm`: the project's provider
        settings, read before the run let its database connection go)."""
        provider = get_provider(request.model, llm=self.llm)
        # Governance hook: meter each provider call of the run; the tool calls the model
        # asks for are counted as they arrive.
        self.usage.meter = usage_meter_add(
            self.usage.meter, provider=provider, model=request.model, messages=request.messages
        )
        with span(
            "llm.call",
            **{"gen_ai.system": provider.name, "gen_ai.request.model": request.model or None},
        ) as s:
            outcome = stream_deltas(
                redis=self.redis,
                run=self.run_,
                deltas=coalesced(
                    provider.stream(request, should_stop=self.stop),
                    window=settings.CHAT_DELTA_WINDOW_SECONDS,
                    threaded=provider.name != OfflineProvider.name,  # the offline one never waits
                    should_stop=self.stop,  # asked while the provider is silent
                ),
                parts=parts,
                stop=self.stop,
                calls=calls,
                meter=self.usage.meter,
                usage=self.usage,
            )
            if s.is_recording():
                _provider_attributes(s, provider, outcome=outcome, calls=len(calls))
        return outcome

    def _call(self, *, step: int, calls: list[ToolCallRequest]) -> list[str] | str:
        """Run one step's calls; their results for the model, or an outcome (a str)."""
        entries = [self._entry(step=step, call=call) for call in calls]
        self.steps.extend(entries)
        if not self._save():
            return "stopped"
        for entry in entries:
            data = {k: entry[k] for k in ("step", "call_id", "name", "arguments")}
            if not self._event(streams.TOOL_CALL, data):
                return "cancelled"
        outcomes = self._execute(calls)
        results = []
        for entry, outcome in zip(entries, outcomes, strict=True):
            results.append(shorten_raw(outcome.content, settings.TOOL_RESULT_MAX_CHARS))
            if not self._record(entry, outcome):
                return "cancelled"
        if not self._save():
            return "stopped"
        return results

    def _entry(self, *, step: int, call: ToolCallRequest) -> dict[str, Any]:
        """The step entry of a call about to start."""
        spec = self.tools.get(call.name)
        return {
            "type": "tool",
            "attempt": self.run_.attempt,
            "step": step,
            "call_id": call.id,
            "name": call.name,
            "arguments": shorten_raw(
                scrub(call.arguments, self.scope.secrets), settings.TOOL_EVENT_MAX_CHARS
            ),
            # A call of no tool does nothing: it may be repeated.
            "safe_to_repeat": spec.safe_to_repeat if spec else True,
            "status": "started",
            "started_at": timezone.now().isoformat(),
        }

    def _execute(self, calls: list[ToolCallRequest]) -> list[ToolOutcome]:
        workers = max(1, min(len(calls), settings.TOOL_MAX_PARALLEL))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tool") as pool:
            # in_context: each call's span is a child of the run's, on whichever thread.
            return list(pool.map(in_context(self._execute_one), calls))

    def _execute_one(self, call: ToolCallRequest) -> ToolOutcome:
        spec = self.tools.get(call.name)
        with span(
            "tool.call",
            **{"uws.tool.name": call.name, "uws.tool.kind": spec.kind if spec else "unknown"},
        ) as s:
            started = time.monotonic()
            outcome = tool_execute(spec=spec, arguments=call.arguments, scope=self.scope)
            s.set_attribute("uws.tool.status", "ok" if outcome.ok else "error")
            s.set_attribute("uws.tool.duration_ms", round((time.monotonic() - started) * 1000, 3))
        return outcome

    def _record(self, entry: dict[str, Any], outcome: ToolOutcome) -> bool:
        """A call's end, in its step entry and as an event; False when cancelled."""
        cut = len(outcome.content) > settings.TOOL_EVENT_MAX_CHARS
        entry.update(
            status="done" if outcome.ok else "error",
            result=shorten_raw(outcome.content, settings.TOOL_EVENT_MAX_CHARS),
            finished_at=timezone.now().isoformat(),
            **outcome.extra,
        )
        data = {k: entry[k] for k in ("step", "call_id", "name", "result")}
        data.update(outcome.extra)
        if not self._event(streams.TOOL_RESULT, {**data, "ok": outcome.ok, "truncated": cut}):
            return False
        if outcome.ok and "memory" in outcome.extra:
            # The agent changed one of its memory blocks (tools.runner._memory_tool).
            return self._event(streams.MEMORY_UPDATED, dict(outcome.extra["memory"]))
        return True

    def _save(self) -> bool:
        """Write the steps, if the run is still this worker's."""
        saved = state.run_steps_save(run=self.run_, steps=self.steps)
        release_database()
        return saved

    def _event(self, event_type: str, data: dict[str, Any]) -> bool:
        run = self.run_
        return (
            streams.event_append_unless_cancelled(
                redis=self.redis,
                session_id=run.session_id,
                message_id=run.message_id,
                event_type=event_type,
                data={"message_id": run.message_id, "run_id": str(run.id), **data},
            )
            is not None
        )


def _provider_attributes(s, provider, *, outcome: str, calls: int) -> None:
    """What a provider call used (as the endpoint reported it), on its span."""
    s.set_attribute("uws.llm.outcome", outcome)
    s.set_attribute("uws.llm.tool_calls", calls)
    usage = getattr(provider, "usage", None)
    if usage is None:
        return
    for name, attribute in (
        ("prompt_tokens", "gen_ai.usage.input_tokens"),
        ("completion_tokens", "gen_ai.usage.output_tokens"),
    ):
        value = usage.get(name) if isinstance(usage, dict) else getattr(usage, name, None)
        if isinstance(value, int):
            s.set_attribute(attribute, value)
    model = getattr(provider, "usage_model", "")
    if model:
        s.set_attribute("gen_ai.response.model", model)


def with_results(
    request: ChatRequest, *, said: str, calls: list[ToolCallRequest], results: list[str]
) -> ChatRequest:
    """The request of the next step: what the model said and asked, and what its calls
    returned, after the conversation so far."""
    asked = {
        "role": "assistant",
        "content": said or None,
        "tool_calls": [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": call.arguments},
            }
            for call in calls
        ],
    }
    answered = [
        {"role": "tool", "tool_call_id": call.id, "content": result}
        for call, result in zip(calls, results, strict=True)
    ]
    return replace(request, messages=[*request.messages, asked, *answered])


def stream_deltas(
    *,
    redis: ScopedRedis,
    run: Run,
    deltas,
    parts: list[str],
    stop: Callable[[], bool],
    calls: list[ToolCallRequest],
    meter,
    usage: Usage | None = None,
) -> str:
    """Append the provider's text deltas to the session's stream (unless the run was
    cancelled) and collect the tool calls it asks for."""
    # The text of earlier steps stays: offsets go on from it.
    offset = sum(map(len, parts))
    try:
        for delta in deltas:
            if isinstance(delta, ToolCallRequest):
                meter.tool_calls += 1
                calls.append(delta)
                continue
            appended = streams.event_append_unless_cancelled(
                redis=redis,
                session_id=run.session_id,
                message_id=run.message_id,
                event_type=streams.MESSAGE_DELTA,
                data={"message_id": run.message_id, "delta": delta, "offset": offset},
            )
            if appended is None:  # cancelled: nothing more reaches the client
                return "cancelled"
            if usage is not None and usage.first_token_at is None:
                usage.first_token_at = timezone.now()
            parts.append(delta)
            offset += len(delta)
            if stop():
                return "stopped"
    except DeltasStopped:
        return "stopped"
    finally:
        close = getattr(deltas, "close", None)
        if close is not None:
            close()
    return "done"
