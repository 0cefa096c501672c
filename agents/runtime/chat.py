"""An agent answering one chat message, on a worker: one `Run`.

The run claims its row (queued -> running, conditional on its dispatch generation),
holds a lease while it works, streams the answer's deltas into the session's event
stream, and ends the run exactly once (done, error or cancelled). Every write is
conditional on the run still being this worker's, so a worker that lost its run (the
recovery pass took it back, a user cancelled it, the project was deleted) stops without
touching it.

With tools, the answer is a loop (`ToolLoop`): the model is asked with the agent's
tools, the calls it asks for run (in parallel when it asks for several), their results
go back to it, until it answers or the run reaches its step limit; each step is an event
and an entry of `Run.steps`. A session answers one message at a time: a run queued
behind an older one of its session waits for it (agents.runs).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.db.models import F, Q
from django.utils import timezone
from redis.exceptions import RedisError

from agentbus import project_gone
from common.lifecycle import worker_stopping
from governance.providers import provider_settings_for
from governance.usage import (
    usage_charge,
    usage_meter_add,
    usage_record,
    usage_row_write,
    usage_run_ended,
)
from workspaces.manager import get_worker_space
from workspaces.redis import ScopedRedis, scoped

from ..models import Message, Run
from ..tools.runner import (
    ToolScope,
    ToolSpec,
    agent_tools,
    project_secrets,
    scrub,
    tool_execute,
    tools_expand,
)
from . import streams
from .coalesce import DeltasStopped, coalesced
from .lease import Held, lease_deadline, lease_keeper
from .providers import (
    ChatRequest,
    OfflineProvider,
    ProviderError,
    ProviderStopped,
    ToolCallRequest,
    get_provider,
)
from .vectors import context_search, exchange_store, exchanges_forget, query_embed

logger = logging.getLogger(__name__)

DEFAULT_TOP_K = 4
HISTORY_MESSAGES = 20
# How often a long run looks whether its project was deleted meanwhile.
TOMBSTONE_CHECK_SECONDS = 0.5
WORKER_NAME = f"{socket.gethostname()}:{os.getpid()}"


class AgentRunFailed(Exception):
    """Raised by the task after a run ended in error, so Celery (and Flower) count it as
    a failed task. The run and its message already say why."""


def message_event_data(message: Message) -> dict[str, Any]:
    """A message as events and the API show it."""
    return {
        "id": message.id,
        "session_id": str(message.session_id),
        "role": message.role,
        "content": message.content,
        "status": message.status,
        "error": message.error,
        "created_at": message.created_at.isoformat() if message.created_at else None,
    }


def run_end(
    *,
    run: Run,
    status: str,
    content: str | None = "",
    error: str = "",
    from_statuses: tuple[str, ...] = (Run.Status.RUNNING,),
    attempt: int | None = None,
    usage: dict[str, Any] | None = None,
) -> bool:
    """End a run and its message once, conditionally (on its status, and on the dispatch
    generation when given): True when this call ended it. Says so on the event stream.
    `content` None leaves the message's text as it is (a cancel from outside the run).
    `usage` (governance.usage.usage_record's arguments) is written in the same
    transaction: a run never ends without its usage row, whatever fails between; when
    this call does not end the run, it is recorded on its own.

    The end commits with its event still owed (a finished run keeps a lease until the
    event is written): if this process dies or Redis fails in between, the recovery
    pass writes the event (`run_end_event_repair`), so a live client always sees how
    the answer ended."""
    fence = Q(id=run.id, status__in=from_statuses)
    if attempt is not None:
        fence &= Q(attempt=attempt)
    tokens = None
    with transaction.atomic():
        ended = Run.objects.filter(fence).update(
            status=status,
            error=error,
            finished_at=timezone.now(),
            lease_expires_at=lease_deadline(),
        )
        if ended:
            written = {"status": status, "error": error}
            if content is not None:
                written["content"] = content
            Message.objects.filter(id=run.message_id).update(**written)
            if usage is not None:
                tokens = usage_row_write(**usage)
    if usage is not None:
        if not ended:
            usage_record(**usage)  # the cost was real, whoever ended the run
        elif tokens is not None:
            usage_charge(
                **{k: usage[k] for k in ("run_id", "project_id", "user_id", "accepted_at")},
                meter=usage["meter"],
                tokens=tokens,
                outcome=usage["outcome"],
            )
    if ended:
        event, data = {
            Run.Status.DONE: (streams.MESSAGE_COMPLETED, {"content": content, "status": status}),
            Run.Status.ERROR: (streams.MESSAGE_ERROR, {"error": error, "content": content}),
            Run.Status.CANCELLED: (streams.MESSAGE_CANCELLED, {}),
        }[status]
        try:
            streams.event_append(
                redis=_redis_of(run),
                session_id=run.session_id,
                event_type=event,
                data={"message_id": run.message_id, **data},
            )
            Run.objects.filter(id=run.id, status=status).update(lease_expires_at=None)
        except Exception:
            # Still owed: the recovery pass writes it once the lease ran out.
            logger.warning("run %s ended %s; the event was not written yet", run.id, status)
        # Governance hook: the run no longer counts as in flight against quotas.
        project = run.session.project
        usage_run_ended(
            run_id=run.id,
            project_id=project.id,
            user_id=project.owner_id,
            meter=getattr(run, "usage_meter", None),
        )
    return bool(ended)


def _end_event(status: str, message: Message) -> tuple[str, dict[str, Any]]:
    return {
        Run.Status.DONE: (
            streams.MESSAGE_COMPLETED,
            {"content": message.content, "status": message.status},
        ),
        Run.Status.ERROR: (
            streams.MESSAGE_ERROR,
            {"error": message.error, "content": message.content},
        ),
        Run.Status.CANCELLED: (streams.MESSAGE_CANCELLED, {}),
    }[status]


# How far back in a session's stream the repair looks for an end already written.
END_EVENT_LOOKBACK = 200


def run_end_event_repair(*, run: Run) -> bool:
    """Write the end event a finished run still owes (its ender died, or Redis failed,
    between the commit and the event), unless the stream has it already; then release
    the run's lease. True when this call wrote it."""
    redis = _redis_of(run)
    wanted = {streams.MESSAGE_COMPLETED, streams.MESSAGE_ERROR, streams.MESSAGE_CANCELLED}
    tail = redis.xrevrange(streams.stream_key(run.session_id), count=END_EVENT_LOOKBACK)
    written = any(
        fields.get("type") in wanted
        and json.loads(fields.get("data") or "{}").get("message_id") == run.message_id
        for _, fields in tail
    )
    if not written:
        message = Message.objects.get(id=run.message_id)
        event, data = _end_event(run.status, message)
        streams.event_append(
            redis=redis,
            session_id=run.session_id,
            event_type=event,
            data={"message_id": run.message_id, **data},
        )
    Run.objects.filter(id=run.id, status=run.status).update(lease_expires_at=None)
    return not written


def run_take_back(*, run: Run, from_status: str, attempt: int | None = None) -> bool:
    """Put a run back to queued as a new attempt, for the recovery pass to dispatch:
    True when this call took it (fenced on its status and dispatch generation)."""
    taken = Run.objects.filter(
        id=run.id, attempt=run.attempt if attempt is None else attempt, status=from_status
    ).update(
        status=Run.Status.QUEUED,
        attempt=F("attempt") + 1,
        lease_expires_at=None,
        dispatched_at=None,
    )
    if not taken:
        return False
    run.refresh_from_db(fields=["attempt", "status"])
    if from_status == Run.Status.RUNNING:
        Message.objects.filter(id=run.message_id, status=Message.Status.STREAMING).update(
            status=Message.Status.PENDING
        )
    return True


def _redis_of(run: Run) -> ScopedRedis:
    project = run.session.project
    return scoped(project.owner_id, project.id)


def conversation(message: Message) -> list[tuple[str, str]]:
    """The (role, content) pairs the answer to `message` follows, oldest first: the
    user's messages and the finished answers, at most HISTORY_MESSAGES + 1 of them."""
    history = list(
        Message.objects.filter(session_id=message.session_id, id__lt=message.id)
        .filter(Q(role=Message.Role.USER) | Q(role=Message.Role.ASSISTANT, status="done"))
        .order_by("-id")
        .values_list("role", "content")[: HISTORY_MESSAGES + 1]
    )
    history.reverse()
    return history


def release_database() -> None:
    """Hand this thread's database connection back to the pool before a wait (an
    embedding, the provider): with many runs per process, a run that sits on a
    connection while it waits starves the others."""
    if not connection.in_atomic_block:
        connection.close()


def _build_request(
    *,
    config: dict[str, Any],
    history: list[tuple[str, str]],
    question: str,
    context: list[str],
    tools: list[ToolSpec] = (),
) -> ChatRequest:
    system = config.get("system_prompt") or "You are a helpful assistant."
    if context:
        joined = "\n\n".join(f"[{i}] {text}" for i, text in enumerate(context, 1))
        system = f"{system}\n\nContext you may use to answer:\n{joined}"
    messages = [{"role": "system", "content": system}]
    messages += [{"role": role, "content": content} for role, content in history]
    return ChatRequest(
        model=config.get("model") or "",
        messages=messages,
        params=dict(config.get("params") or {}),
        context=context,
        question=question,
        tools=[tool.as_openai() for tool in tools],
    )


def chat_run(*, run_id: uuid.UUID | str, attempt: int) -> str:
    """Run `run_id` if dispatch generation `attempt` may; returns the outcome (for logs
    and tests). Raises AgentRunFailed when the run ended in error here."""
    run = Run.objects.select_related("message", "session__project").filter(id=run_id).first()
    if run is None:
        return "gone"
    if run.attempt != attempt:
        return "stale"  # an older dispatch: the newer one owns the run and its mark
    redis = _redis_of(run)
    try:
        streams.runs_unmark(redis=redis, run_ids=[str(run.id)])
    except Exception:
        logger.warning("run %s: could not clear its dispatch mark", run.id, exc_info=True)
    if run.status != Run.Status.QUEUED:
        return "stale"  # already ended (cancelled, expired)
    if worker_stopping():
        # This worker is shutting down: the run is not started here, and the recovery
        # pass dispatches it again (it has no dispatch to wait for).
        Run.objects.filter(id=run.id, attempt=attempt, status=Run.Status.QUEUED).update(
            dispatched_at=None
        )
        return "stopping"
    if _waits_behind_another(run):
        # One answer at a time per session: this one is dispatched again when the
        # older one ends (agents.runs.run_next_dispatch).
        Run.objects.filter(id=run.id, attempt=attempt, status=Run.Status.QUEUED).update(
            dispatched_at=None
        )
        return "waiting"
    claimed = Run.objects.filter(id=run.id, attempt=attempt, status=Run.Status.QUEUED).update(
        status=Run.Status.RUNNING,
        starts=F("starts") + 1,
        lease_expires_at=lease_deadline(),
        worker=WORKER_NAME,
        started_at=timezone.now(),
    )
    if not claimed:
        return "stale"
    run.refresh_from_db(fields=["starts", "status"])
    return _run_claimed(run=run, attempt=attempt, redis=redis)


def _waits_behind_another(run: Run) -> bool:
    return Run.objects.filter(
        session_id=run.session_id,
        status__in=(Run.Status.QUEUED, Run.Status.RUNNING),
        created_at__lt=run.created_at,
    ).exists()


def _run_claimed(*, run: Run, attempt: int, redis: ScopedRedis) -> str:
    message = run.message
    if run.starts > settings.RUN_MAX_STARTS:
        run_end(
            run=run,
            status=Run.Status.ERROR,
            attempt=attempt,
            error=f"the agent run was interrupted {run.starts - 1} times and gave up",
        )
        raise AgentRunFailed(str(run.id))
    if run.starts > 1:
        unsafe = sorted(
            {
                step["name"]
                for step in run.steps or ()
                if step.get("type") == "tool" and not step.get("safe_to_repeat")
            }
        )
        if unsafe:
            # Starting over could make these calls a second time.
            run_end(
                run=run,
                status=Run.Status.ERROR,
                attempt=attempt,
                error="the agent run was interrupted after calling "
                f"{', '.join(unsafe)}, which may not be repeated safely; it may have "
                "taken effect. Check, then ask again.",
            )
            raise AgentRunFailed(str(run.id))
    Message.objects.filter(
        id=message.id, status__in=(Message.Status.PENDING, Message.Status.STREAMING)
    ).update(status=Message.Status.STREAMING, content="", error="")
    if run.starts > 1:
        # A worker died mid-answer: what the client holds of it is replaced.
        streams.event_append(
            redis=redis,
            session_id=run.session_id,
            event_type=streams.MESSAGE_RESTARTED,
            data={"message_id": message.id, "attempt": attempt},
        )
    project = run.session.project
    space = get_worker_space(user_id=project.owner_id, project_id=project.id)
    with lease_keeper().hold(run.id, attempt) as held, space.use():
        answer = _answer(run=run, held=held, space=space, redis=redis)
    # Governance hook: what this attempt cost (as the provider reported it, or estimated);
    # a run that ends here writes it in the transaction that ends it (run_end).
    usage = {
        "run_id": run.id,
        "attempt": attempt,
        "project_id": project.id,
        "user_id": project.owner_id,
        "agent_id": run.agent_id,
        "message_id": message.id,
        "accepted_at": run.created_at,
        "meter": getattr(run, "usage_meter", None),
        "completion": answer.content,
        "outcome": answer.outcome,
    }
    outcome, content, error = answer.outcome, answer.content, answer.error
    if outcome == "done":
        if run_end(run=run, status=Run.Status.DONE, content=content, attempt=attempt, usage=usage):
            release_database()  # remembering embeds: no connection held meanwhile
            _remember_exchange(
                run=run,
                content=content,
                question=answer.question,
                question_vector=answer.question_vector,
            )
            return "done"
        return "lost"
    if outcome == "error":
        if run_end(
            run=run,
            status=Run.Status.ERROR,
            content=content,
            error=error,
            attempt=attempt,
            usage=usage,
        ):
            raise AgentRunFailed(f"run {run.id}: {error}")
        return "lost"
    usage_record(**usage)
    if outcome == "handed-back":
        # The worker is shutting down: the run goes back to queued with its lease
        # released, and the recovery pass dispatches it to a worker that runs on; its
        # next start tells the client the answer starts over.
        run_take_back(run=run, from_status=Run.Status.RUNNING, attempt=attempt)
        return outcome
    if outcome == "interrupted":
        # Redis went away mid-answer: not the agent's failure. Queued again, the run is
        # dispatched by the recovery pass once Redis is back, and its next start tells
        # the client the answer starts over.
        run_take_back(run=run, from_status=Run.Status.RUNNING, attempt=attempt)
        return outcome
    if outcome == "cancelled":
        # The canceller ends the run (or has); what was said before the cancel stays.
        Message.objects.filter(
            id=message.id, status__in=(Message.Status.STREAMING, Message.Status.CANCELLED)
        ).update(content=content)
    if outcome == "project-deleted":
        # Teardown may have removed the stream before our last events re-created it.
        redis.delete(streams.stream_key(run.session_id), streams.cancel_key(message.id))
    return outcome


@dataclass
class Answer:
    outcome: str  # done, error, cancelled, lost, interrupted, handed-back, project-deleted
    content: str = ""
    error: str = ""
    question: str = ""
    question_vector: list[float] | None = None


def _answer(*, run: Run, held: Held, space, redis: ScopedRedis) -> Answer:
    message = run.message
    project_id = run.session.project_id
    next_check = [time.monotonic() + TOMBSTONE_CHECK_SECONDS]
    gone = [False]
    # The run's own time limit: Celery's are not enforced in the thread pool.
    deadline = time.monotonic() + settings.RUN_TIME_LIMIT_SECONDS

    def should_stop() -> bool:
        if time.monotonic() >= next_check[0]:
            gone[0] = gone[0] or project_gone(project_id)
            next_check[0] = time.monotonic() + TOMBSTONE_CHECK_SECONDS
        return gone[0] or held.should_stop or worker_stopping() or time.monotonic() >= deadline

    def stopped(content: str) -> Answer:
        if gone[0]:
            return Answer("project-deleted", content)
        if held.should_stop:
            return Answer("cancelled" if held.cancelled.is_set() else "lost", content)
        if time.monotonic() >= deadline:
            limit = settings.RUN_TIME_LIMIT_SECONDS
            return Answer("error", content, f"the agent run reached its time limit ({limit:g}s)")
        return Answer("handed-back" if worker_stopping() else "lost", content)

    parts: list[str] = []
    question, question_vector = "", None
    try:
        config = space.get_agent(str(run.agent_id))
        if config is None:
            return Answer("error", error="the agent no longer exists")
        history = conversation(message)
        question = next((c for role, c in reversed(history) if role == Message.Role.USER), "")
        tools = agent_tools(agent_id=run.agent_id)
        secrets = project_secrets(project_id=project_id) if _uses_secrets(tools) else {}
        params = config.get("params") or {}
        # Governance hook: the project's own provider settings, over the deployment's.
        llm = provider_settings_for(project_id=project_id)
        Run.objects.filter(id=run.id, attempt=run.attempt).update(model=_model_name(config, llm))
        # Nothing more from the database until the run ends, but the run's steps (the
        # lease keeper has its own connection).
        release_database()
        tools = tools_expand(tools, redis=redis, secrets=secrets)
        # An agent with the search tool searches when it decides to; others always do.
        searches = any(t.kind == "builtin" and t.name == "search_context" for t in tools)
        # Embedded once: to search now (unless the agent searches by tool), and to
        # remember the exchange by afterwards.
        question_vector = query_embed(question) if question.strip() else None
        hits = context_search(
            user_id=space.user_id,
            project_id=project_id,
            agent_id=config["id"],
            query=question,
            k=0 if searches else int(params.get("top_k", DEFAULT_TOP_K)),
            vector=question_vector,
        )
        request = _build_request(
            config=config,
            history=history,
            question=question,
            context=[h.text for h in hits],
            tools=tools,
        )
        request = replace(request, deadline=deadline)
        loop = ToolLoop(
            redis=redis,
            run=run,
            tools=tools,
            scope=ToolScope(
                user_id=space.user_id,
                project_id=project_id,
                agent_id=config["id"],
                secrets=secrets,
                run_id=str(run.id),
                should_stop=should_stop,
                deadline=deadline,
            ),
            max_steps=int(params.get("max_steps", settings.TOOL_MAX_STEPS)),
            stop=should_stop,
            llm=llm,
        )
        outcome = loop.run(request=request, parts=parts)
    except ProviderStopped:
        return stopped("".join(parts))
    except ProviderError as exc:
        if should_stop():  # e.g. its call timed out at the run's deadline: say why
            return stopped("".join(parts))
        return Answer("error", "".join(parts), str(exc))
    except RedisError as exc:
        logger.warning("agent run %s interrupted, Redis unavailable: %r", run.id, exc)
        return Answer("interrupted", "".join(parts))
    except Exception as exc:
        logger.exception("agent run %s failed", run.id)
        return Answer("error", "".join(parts), f"the agent run failed: {type(exc).__name__}")
    if outcome == "cancelled":
        return Answer("cancelled", "".join(parts))
    if outcome == "step-limit":
        return Answer(
            "error",
            "".join(parts),
            f"the agent reached its step limit ({loop.max_steps}) without an answer",
        )
    if outcome != "done":
        return stopped("".join(parts))
    return Answer("done", "".join(parts), question=question, question_vector=question_vector)


def _uses_secrets(tools: list[ToolSpec]) -> bool:
    return any(tool.headers for tool in tools)


def _model_name(config: dict[str, Any], llm) -> str:
    model = config.get("model") or ""
    try:
        if get_provider(model, llm=llm).name == OfflineProvider.name:
            return OfflineProvider.name
        if llm is not None:
            return llm.model_for(model, settings.LLM_DEFAULT_MODEL)
    except ProviderError:  # a model the project does not allow: the run says so
        pass
    return model or settings.LLM_DEFAULT_MODEL


class ToolLoop:
    """One answer as steps: ask the model (with the agent's tools); run the calls it asks
    for, in parallel; give it their results; again, until it answers without calling a
    tool or `max_steps` is reached. Outcomes: done, cancelled, stopped, step-limit.

    Before its calls run, a step is written to `Run.steps` (each call `started`, with
    whether it may be repeated), and again when they ended: a run restarted after its
    worker died knows which calls may have taken effect (see `_run_claimed`)."""

    def __init__(
        self,
        *,
        redis: ScopedRedis,
        run: Run,
        tools: list[ToolSpec],
        scope: ToolScope,
        max_steps: int,
        stop: Callable[[], bool],
        llm=None,
    ) -> None:
        self.redis, self.run_, self.scope, self.stop, self.llm = redis, run, scope, stop, llm
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
            outcome = _stream(
                redis=self.redis,
                run=self.run_,
                request=request,
                parts=parts,
                stop=self.stop,
                calls=calls,
                llm=self.llm,
            )
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
            said = "".join(parts[before:])
            request = replace(
                request,
                messages=[
                    *request.messages,
                    {
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
                    },
                    *(
                        {"role": "tool", "tool_call_id": call.id, "content": result}
                        for call, result in zip(calls, results, strict=True)
                    ),
                ],
            )
        return "step-limit"

    def _call(self, *, step: int, calls: list[ToolCallRequest]) -> list[str] | str:
        """Run one step's calls; their results for the model, or an outcome (a str)."""
        attempt = self.run_.attempt
        entries = []
        for call in calls:
            spec = self.tools.get(call.name)
            entries.append(
                {
                    "type": "tool",
                    "attempt": attempt,
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
            )
        self.steps.extend(entries)
        if not self._save():
            return "stopped"
        for entry in entries:
            data = {k: entry[k] for k in ("step", "call_id", "name", "arguments")}
            if not self._event(streams.TOOL_CALL, data):
                return "cancelled"
        workers = max(1, min(len(calls), settings.TOOL_MAX_PARALLEL))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tool") as pool:
            outcomes = list(
                pool.map(
                    lambda call: tool_execute(
                        spec=self.tools.get(call.name), arguments=call.arguments, scope=self.scope
                    ),
                    calls,
                )
            )
        results = []
        for entry, outcome in zip(entries, outcomes, strict=True):
            cut = len(outcome.content) > settings.TOOL_EVENT_MAX_CHARS
            entry.update(
                status="done" if outcome.ok else "error",
                result=shorten_raw(outcome.content, settings.TOOL_EVENT_MAX_CHARS),
                finished_at=timezone.now().isoformat(),
                **outcome.extra,
            )
            results.append(shorten_raw(outcome.content, settings.TOOL_RESULT_MAX_CHARS))
            data = {k: entry[k] for k in ("step", "call_id", "name", "result")}
            data.update(outcome.extra)
            if not self._event(streams.TOOL_RESULT, {**data, "ok": outcome.ok, "truncated": cut}):
                return "cancelled"
        if not self._save():
            return "stopped"
        return results

    def _save(self) -> bool:
        """Write the steps, if the run is still this worker's."""
        run = self.run_
        saved = Run.objects.filter(
            id=run.id, attempt=run.attempt, status=Run.Status.RUNNING
        ).update(steps=self.steps)
        release_database()
        return bool(saved)

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


def shorten_raw(text: str, limit: int) -> str:
    """`text` cut to `limit` characters (whitespace kept, unlike `shorten`)."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _stream(
    *,
    redis: ScopedRedis,
    run: Run,
    request: ChatRequest,
    parts: list[str],
    stop: Callable[[], bool],
    calls: list[ToolCallRequest] | None = None,
    llm=None,
) -> str:
    """One provider call of the run, its text streamed as deltas (`llm`: the project's
    provider settings, read before the run let its database connection go)."""
    # The text of earlier steps stays: offsets go on from it.
    offset = sum(map(len, parts))
    provider = get_provider(request.model, llm=llm)
    # Governance hook: meter each provider call of the run (usage_record in _run_claimed
    # reads the sum); the tool calls the model asks for are counted as they arrive.
    meter = run.usage_meter = usage_meter_add(
        getattr(run, "usage_meter", None),
        provider=provider,
        model=request.model,
        messages=request.messages,
    )
    deltas = coalesced(
        provider.stream(request, should_stop=stop),
        window=settings.CHAT_DELTA_WINDOW_SECONDS,
        threaded=provider.name != OfflineProvider.name,  # the offline one never waits
        should_stop=stop,  # asked while the provider is silent
    )
    try:
        for delta in deltas:
            if isinstance(delta, ToolCallRequest):
                meter.tool_calls += 1
                if calls is not None:
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


def _remember_exchange(
    *, run: Run, content: str, question: str, question_vector: list[float] | None
) -> None:
    if not content.strip() or not question.strip():
        return
    project = run.session.project
    try:
        # What regenerate replaced is out of the conversation: out of memory too, or
        # the replaced answer would keep coming back as the nearest context.
        exchanges_forget(
            user_id=project.owner_id,
            project_id=project.id,
            agent_id=str(run.agent_id),
            question=question,
            answers=_replaced_answers(run),
        )
        exchange_store(
            user_id=project.owner_id,
            project_id=project.id,
            agent_id=str(run.agent_id),
            question=question,
            answer=content,
            payload={"session_id": str(run.session_id), "message_id": run.message_id},
            question_vector=question_vector,
        )
    except Exception:
        # The answer stands; only the memory of it is missing.
        logger.exception("could not add the exchange of run %s to context", run.id)


def _replaced_answers(run: Run) -> list[str]:
    """The answers regenerate replaced with this run's: superseded, after the question."""
    asked = (
        Message.objects.filter(
            session_id=run.session_id, role=Message.Role.USER, id__lt=run.message_id
        )
        .order_by("-id")
        .values_list("id", flat=True)
        .first()
    )
    if asked is None:
        return []
    return list(
        Message.objects.filter(
            session_id=run.session_id,
            role=Message.Role.ASSISTANT,
            status=Message.Status.SUPERSEDED,
            id__gt=asked,
            id__lt=run.message_id,
        ).values_list("content", flat=True)
    )
