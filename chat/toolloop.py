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
from tools.runner import ToolOutcome, ToolScope, ToolSpec, scrub, tool_arguments, tool_execute
from workspaces.redis import ScopedRedis

from . import state, streams
from .coalesce import DeltasStopped, coalesced
from .models import Run
from .suspend import HANDED_BACK, AgentCallRefused, agent_call_start


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
    """Outcomes of `run`: done, cancelled, stopped, step-limit, waiting (stored to wait
    for an approval or for the agents it asked: chat.suspend)."""

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
        # Set when `run` returns "waiting": (the state to store, the run.waiting event).
        self.suspension: tuple[dict[str, Any], dict[str, Any]] | None = None
        # After each step whose calls were made: the state a run handed back goes on
        # from (stored as a suspension, reason HANDED_BACK), so its next start neither
        # makes those calls again nor refuses to go on for fear it would.
        self.checkpoint: dict[str, Any] | None = None

    def run(
        self, *, request: ChatRequest, parts: list[str], resumed: dict[str, Any] | None = None
    ) -> str:
        """`resumed`: the state the run waited with (chat.suspend); the loop finishes
        that step's calls, then goes on from the next step."""
        first = 1
        if resumed is not None:
            # An approval may have edited arguments: the model is told the call as made.
            edits = (resumed.get("decision") or {}).get("arguments") or {}
            calls = [
                ToolCallRequest(c["id"], c["name"], edits.get(c["id"], c["arguments"]))
                for c in resumed["calls"]
            ]
            results = self._resume(resumed, calls=calls, request=request, parts=parts)
            if isinstance(results, str):
                return results
            self._checkpoint(resumed["step"], calls, request, resumed["said"], parts, results)
            request = with_results(request, said=resumed["said"], calls=calls, results=results)
            first = resumed["step"] + 1
        for step in range(first, self.max_steps + 1):
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
            said = "".join(parts[before:])
            results = self._call(step=step, calls=calls, request=request, said=said, parts=parts)
            if isinstance(results, str):
                return results
            self._checkpoint(step, calls, request, said, parts, results)
            request = with_results(request, said=said, calls=calls, results=results)
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

    def _call(
        self,
        *,
        step: int,
        calls: list[ToolCallRequest],
        request: ChatRequest,
        said: str,
        parts: list[str],
    ) -> list[str] | str:
        """Run one step's calls; their results for the model, or an outcome (a str):
        "waiting" when the run is to be stored (`self.suspension`) until a call is
        approved or the agents it asked answered."""
        entries = [self._entry(step=step, call=call) for call in calls]
        self.steps.extend(entries)
        pending = [call.id for call in calls if self._needs_approval(call)]
        if pending:
            for entry in entries:
                entry["status"] = "awaiting-approval" if entry["call_id"] in pending else "waiting"
            for entry in entries:
                data = {k: entry[k] for k in ("step", "call_id", "name", "arguments")}
                data["approval"] = entry["call_id"] in pending
                if not self._event(streams.TOOL_CALL, data):
                    return "cancelled"
            return self._suspend(
                self._state(
                    reason="approval", step=step, calls=calls, request=request, said=said,
                    parts=parts, approval=pending,
                )
            )  # fmt: skip
        return self._run_calls(
            step=step, calls=calls, entries=entries, request=request, said=said, parts=parts
        )

    def _run_calls(
        self,
        *,
        step: int,
        calls: list[ToolCallRequest],
        entries: list[dict[str, Any]],
        request: ChatRequest,
        said: str,
        parts: list[str],
        decision: dict[str, Any] | None = None,
        approval: tuple[str, ...] = (),
    ) -> list[str] | str:
        """Make the step's calls (`decision`: the owner's on the calls of `approval`):
        an agent asked is a child run the loop does not wait for (it suspends once the
        other calls ran); the others run, in parallel."""
        calls = self._decided(calls, entries, decision)
        if not self._save():
            return "stopped"
        if decision is None:
            for entry in entries:
                data = {k: entry[k] for k in ("step", "call_id", "name", "arguments")}
                if not self._event(streams.TOOL_CALL, data):
                    return "cancelled"
        rejected = set(approval) if decision and not decision.get("approved") else set()
        reason = (decision or {}).get("reason") or "no reason given"
        outcomes, children = self._outcomes(calls, rejected=rejected, reason=reason)
        for entry in entries:
            if entry["call_id"] in children:
                entry.update(status="waiting", child_run_id=children[entry["call_id"]])
            elif not self._record(entry, outcomes[entry["call_id"]]):
                return "cancelled"
        if children:
            results = {
                call_id: {
                    "ok": o.ok,
                    "content": shorten_raw(o.content, settings.TOOL_RESULT_MAX_CHARS),
                    "extra": o.extra,
                }
                for call_id, o in outcomes.items()
            }
            return self._suspend(
                self._state(
                    reason="agents", step=step, calls=calls, request=request, said=said,
                    parts=parts, results=results, children=children,
                )
            )  # fmt: skip
        if not self._save():
            return "stopped"
        return [
            shorten_raw(outcomes[call.id].content, settings.TOOL_RESULT_MAX_CHARS) for call in calls
        ]

    def _decided(
        self,
        calls: list[ToolCallRequest],
        entries: list[dict[str, Any]],
        decision: dict[str, Any] | None,
    ) -> list[ToolCallRequest]:
        """The calls with the owner's edits to their arguments; their entries started,
        the edited ones marked and showing the edit (secrets scrubbed)."""
        edits = (decision or {}).get("arguments") or {}
        for entry in entries:
            entry.update(status="started", attempt=self.run_.attempt)
            if entry["call_id"] in edits:
                entry.update(
                    arguments=shorten_raw(
                        scrub(edits[entry["call_id"]], self.scope.secrets),
                        settings.TOOL_EVENT_MAX_CHARS,
                    ),
                    edited=True,
                )
        return [ToolCallRequest(c.id, c.name, edits.get(c.id, c.arguments)) for c in calls]

    def _outcomes(
        self, calls: list[ToolCallRequest], *, rejected: set[str], reason: str
    ) -> tuple[dict[str, ToolOutcome], dict[str, str]]:
        """Each call's outcome, and the child run of each agent asked: a rejected call
        fails with the owner's reason, an agent asked starts its child run (unless it
        cannot), the others run, in parallel."""
        outcomes: dict[str, ToolOutcome] = {}
        children: dict[str, str] = {}
        to_run = []
        for call in calls:
            spec = self.tools.get(call.name)
            if call.id in rejected:
                outcomes[call.id] = ToolOutcome(
                    False, f"error: the owner rejected this call: {reason}"
                )
            elif spec is not None and spec.kind == "agent" and settings.AGENT_CALLS_SUSPEND:
                started = self._agent_start(spec=spec, call=call)
                if isinstance(started, ToolOutcome):
                    outcomes[call.id] = started
                else:
                    children[call.id] = started
            else:
                to_run.append(call)
        for call, outcome in zip(to_run, self._execute(to_run), strict=True):
            outcomes[call.id] = outcome
        return outcomes, children

    def _resume(
        self,
        resumed: dict[str, Any],
        *,
        calls: list[ToolCallRequest],
        request: ChatRequest,
        parts: list[str],
    ) -> list[str] | str:
        """The results of the step the run waited at: the calls approved (or rejected)
        made now, or the answers of the agents it asked."""
        step = resumed["step"]
        entries = [
            next(
                (e for e in reversed(self.steps)
                 if e.get("step") == step and e.get("call_id") == call.id),
                None,
            ) or self._entry(step=step, call=call)
            for call in calls
        ]  # fmt: skip
        if resumed["reason"] == "approval":
            return self._run_calls(
                step=step,
                calls=calls,
                entries=entries,
                request=request,
                said=resumed["said"],
                parts=parts,
                decision=resumed.get("decision") or {},
                approval=tuple(resumed.get("approval") or ()),
            )
        known = resumed.get("results") or {}
        children = resumed.get("children") or {}
        for entry in entries:
            if entry["call_id"] in children:
                result = known.get(entry["call_id"]) or {"ok": False, "content": "error: lost"}
                outcome = ToolOutcome(result["ok"], result["content"], result.get("extra") or {})
                if not self._record(entry, outcome):
                    return "cancelled"
        if not self._save():
            return "stopped"
        return [
            shorten_raw(
                (known.get(call.id) or {}).get("content", "error: lost"),
                settings.TOOL_RESULT_MAX_CHARS,
            )
            for call in calls
        ]

    def _needs_approval(self, call: ToolCallRequest) -> bool:
        spec = self.tools.get(call.name)
        return spec is not None and spec.requires_approval

    def _agent_start(self, *, spec: ToolSpec, call: ToolCallRequest) -> str | ToolOutcome:
        """Start the child run an agent call asks for: its id, or the failed outcome."""
        args = tool_arguments(spec=spec, arguments=call.arguments)
        if isinstance(args, ToolOutcome):
            return args
        try:
            child = agent_call_start(
                parent_run_id=self.run_.id,
                target_agent_id=spec.target_agent_id,
                content=args["message"],
            )
        except AgentCallRefused as exc:
            return ToolOutcome(False, scrub(str(exc), self.scope.secrets))
        finally:
            release_database()
        return str(child.id)

    def _suspend(self, suspended: dict[str, Any]) -> str:
        """Say what the run is to be stored with (`suspended`: `_state`; chat.engine
        stores it): "waiting"."""
        described, children = suspended["calls"], suspended["children"]
        # What the event (and a webhook) shows: the arguments without the secrets.
        event = {
            "reason": suspended["reason"],
            "step": suspended["step"],
            "calls": [
                {
                    "call_id": call["id"],
                    "name": call["name"],
                    "arguments": shorten_raw(
                        scrub(call["arguments"], self.scope.secrets),
                        settings.TOOL_EVENT_MAX_CHARS,
                    ),
                    "requires_approval": call["requires_approval"],
                    **({"child_run_id": children[call["id"]]} if call["id"] in children else {}),
                }
                for call in described
            ],
        }
        self.suspension = (suspended, event)
        return "waiting"

    def _checkpoint(
        self,
        step: int,
        calls: list[ToolCallRequest],
        request: ChatRequest,
        said: str,
        parts: list[str],
        results: list[str],
    ) -> None:
        """The step's calls were made (or, resumed, their results are in): a run given
        back from here goes on from the next step."""
        known = {c.id: {"content": r} for c, r in zip(calls, results, strict=True)}
        self.checkpoint = self._state(
            reason=HANDED_BACK, step=step, calls=calls, request=request, said=said,
            parts=parts, results=known,
        )  # fmt: skip

    def _state(
        self,
        *,
        reason: str,
        step: int,
        calls: list[ToolCallRequest],
        request: ChatRequest,
        said: str,
        parts: list[str],
        approval: list[str] = (),
        results: dict[str, Any] | None = None,
        children: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """The run's state at `step` (`Run.suspended`): the conversation before the
        step's calls, what was said, the calls, and what is known of their results."""
        described = []
        for call in calls:
            spec = self.tools.get(call.name)
            described.append(
                {
                    "id": call.id,
                    "name": call.name,
                    "arguments": call.arguments,
                    "kind": spec.kind if spec else "",
                    "parameters": spec.parameters if spec else {},
                    "requires_approval": call.id in approval,
                }
            )
        return {
            "reason": reason,
            "step": step,
            "messages": request.messages,
            "said": said,
            "content": "".join(parts),
            "calls": described,
            "approval": list(approval),
            "results": results or {},
            "children": children or {},
        }

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
