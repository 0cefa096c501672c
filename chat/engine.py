"""An agent answering one chat message, on a worker: one `Run`.

The run claims its row (queued -> running, conditional on its dispatch generation),
holds a lease while it works, streams the answer's deltas into the session's event
stream, and ends the run exactly once (done, error or cancelled); every status write is
chat.state's, conditional on the run still being this worker's, so a worker that lost
its run (the recovery pass took it back, a user cancelled it, the project was deleted)
stops without touching it.

The answer itself is chat.toolloop's (provider calls and tool calls, step by step). A
session answers one message at a time: a run queued behind an older one of its session
waits for it (chat.dispatch).
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db.models import Q
from django.utils import timezone
from redis.exceptions import RedisError

from agentbus import project_gone
from agents.memory import memory_blocks_prompt
from agents.models import AgentVersion
from agents.versions import version_tool_rows
from common.lifecycle import outage_waited, worker_stopping
from common.tracing import log_context, span
from context.sparse import agent_search_mode
from context.vectors import citation, context_search, exchange_store, exchanges_forget, query_embed
from governance.providers import provider_settings_for
from governance.usage import usage_record
from llm.providers import (
    ChatRequest,
    OfflineProvider,
    ProviderError,
    ProviderStopped,
    get_provider,
)
from tools.runner import ToolScope, ToolSpec, agent_tools, project_secrets, tools_expand
from workspaces.manager import get_worker_space
from workspaces.redis import ScopedRedis, scoped

from . import state, streams
from .lease import Held, lease_keeper
from .models import Message, Run
from .suspend import caller_resume_if_answered
from .toolloop import ToolLoop, Usage, release_database

logger = logging.getLogger(__name__)

DEFAULT_TOP_K = 4
HISTORY_MESSAGES = 20
# How often a long run looks whether its project was deleted meanwhile.
TOMBSTONE_CHECK_SECONDS = 0.5


class AgentRunFailed(Exception):
    """Raised by the task after a run ended in error, so Celery (and Flower) count it as
    a failed task. The run and its message already say why."""


@dataclass
class Answer:
    # done, error, cancelled, lost, interrupted, handed-back, project-deleted, waiting
    outcome: str
    content: str = ""
    error: str = ""
    question: str = ""
    question_vector: list[float] | None = None
    # The question's message (None: the conversation has none).
    question_id: int | None = None
    # The chunks the answer drew on (Message.citations).
    citations: list[dict[str, Any]] = field(default_factory=list)
    # outcome "waiting": what the run is stored with (chat.toolloop.ToolLoop.suspension)
    # and its steps so far.
    suspension: tuple[dict[str, Any], dict[str, Any]] | None = None
    steps: list[dict[str, Any]] = field(default_factory=list)
    # outcome "handed-back", "interrupted": where its next start goes on from, if it
    # made calls (ToolLoop.checkpoint, with the question's vector).
    checkpoint: dict[str, Any] | None = None


@dataclass
class Prepared:
    """What a run answers with, read before it lets its database connection go."""

    config: dict[str, Any]
    history: list[tuple[str, str]]
    question: str
    tools: list[ToolSpec]
    question_id: int | None
    secrets: dict[str, str]
    llm: Any = None
    question_vector: list[float] | None = field(default=None)
    # The agent's memory blocks, as its system prompt carries them.
    memory: str = ""


# --- Claiming the run ---------------------------------------------------------------------


def chat_run(*, run_id: uuid.UUID | str, attempt: int) -> str:
    """Run `run_id` if dispatch generation `attempt` may; returns the outcome (for logs
    and tests). Raises AgentRunFailed when the run ended in error here."""
    with log_context(run_id=run_id), span("chat.run", **{"uws.run_id": str(run_id)}) as s:
        outcome = "error"
        try:
            outcome = _chat_run(run_id=run_id, attempt=attempt)
        finally:
            s.set_attribute("uws.run.outcome", outcome)
        return outcome


def _chat_run(*, run_id: uuid.UUID | str, attempt: int) -> str:
    # Until the run is claimed, this worker holds its task and the run's mark names this
    # worker: a database or Redis out of reach is waited out, as a failed task would
    # leave the run to no one while this worker beats.
    run = outage_waited(lambda: _start(run_id=run_id, attempt=attempt), what=f"run {run_id}")
    if isinstance(run, str):
        return run
    return _run_claimed(run=run, attempt=attempt, redis=_redis_of(run))


def _start(*, run_id: uuid.UUID | str, attempt: int) -> Run | str:
    """Claim the run for this attempt: the run, or the outcome when it is not started."""
    try:
        run = Run.objects.select_related("session__project").get(id=run_id)
    except Run.DoesNotExist:
        return "gone"
    if run.attempt != attempt:
        return "stale"  # an older dispatch: the newer one owns the run and its mark
    try:
        streams.runs_unmark(redis=_redis_of(run), run_ids=[str(run.id)])
    except Exception:
        logger.warning("run %s: could not clear its dispatch mark", run.id, exc_info=True)
    if run.status != Run.Status.QUEUED:
        return "stale"  # already ended (cancelled, expired)
    if worker_stopping():
        # This worker is shutting down: the run is not started here, and the recovery
        # pass dispatches it again (it has no dispatch to wait for).
        state.run_undispatched(run=run, attempt=attempt)
        return "stopping"
    with span("run.claim", **{"uws.run.attempt": attempt}) as s:
        claimed = state.run_claim(run=run, attempt=attempt)
        s.set_attribute("uws.run.claimed", claimed)
    if not claimed:
        # Still queued for this dispatch: an older run of its session has not ended (one
        # answer at a time per session), and the end of that one dispatches this one
        # again (chat.dispatch.run_next_dispatch). Else it was taken back or ended.
        return "waiting" if state.run_undispatched(run=run, attempt=attempt) else "stale"
    return run


def _run_claimed(*, run: Run, attempt: int, redis: ScopedRedis) -> str:
    refusal = _restart_refusal(run)
    if refusal:
        state.run_end(run=run, status=Run.Status.ERROR, attempt=attempt, error=refusal)
        raise AgentRunFailed(str(run.id))
    resumed = bool(run.suspended) and run.starts == 1
    if not resumed:  # a resumed answer goes on from what it said before it waited
        state.message_streaming(run=run)
    if run.starts > 1:
        # A worker died mid-answer: what the client holds of it is replaced.
        streams.event_append(
            redis=redis,
            session_id=run.session_id,
            event_type=streams.MESSAGE_RESTARTED,
            data={"message_id": run.message_id, "attempt": attempt},
        )
    project = run.session.project
    space = get_worker_space(user_id=project.owner_id, project_id=project.id)
    usage = Usage()
    with lease_keeper().hold(run.id, attempt) as held, space.use():
        answer = _answer(run=run, held=held, space=space, redis=redis, usage=usage)
    # Governance hook: what this attempt cost (as the provider reported it, or estimated);
    # a run that ends here writes it in the transaction that ends it (chat.state.run_end).
    cost = {
        "run_id": run.id,
        "attempt": attempt,
        "project_id": project.id,
        "user_id": project.owner_id,
        "agent_id": run.agent_id,
        "message_id": run.message_id,
        "accepted_at": run.created_at,
        "meter": usage.meter,
        "completion": answer.content,
        "outcome": answer.outcome,
    }
    return _settle(
        run=run,
        attempt=attempt,
        redis=redis,
        answer=answer,
        cost=cost,
        first_token_at=usage.first_token_at,
    )


def _restart_refusal(run: Run) -> str:
    """Why a run may not start (again), or "": it lost its workers too often, or a call
    it made before may not be repeated safely."""
    if run.starts > settings.RUN_MAX_STARTS:
        return f"the agent run was interrupted {run.starts - 1} times and gave up"
    if run.starts > 1:
        unsafe = sorted(
            {
                step["name"]
                for step in run.steps or ()
                if step.get("type") == "tool"
                and not step.get("safe_to_repeat")
                and _made_since_resumed(run, step)
            }
        )
        if unsafe:
            # Starting over could make these calls a second time.
            return (
                "the agent run was interrupted after calling "
                f"{', '.join(unsafe)}, which may not be repeated safely; it may have "
                "taken effect. Check, then ask again."
            )
    return ""


def _made_since_resumed(run: Run, step: dict[str, Any]) -> bool:
    """Whether a start again would repeat the call of `step`: any call, unless the run
    resumed from a wait; then only the calls it made since (the earlier ones' results
    are stored with it, and the calls still waiting were not made)."""
    suspended = run.suspended
    if not suspended:
        return True
    if step.get("step", 0) < suspended["step"]:
        return False
    known = set(suspended.get("results") or ()) | set(suspended.get("children") or ())
    return step.get("call_id") not in known and step.get("status") in ("started", "done", "error")


def _settle(
    *,
    run: Run,
    attempt: int,
    redis: ScopedRedis,
    answer: Answer,
    cost: dict[str, Any],
    first_token_at=None,
) -> str:
    """End the run as its answer says (done, error) with what it cost, or record the cost
    and leave the run to whoever ends it."""
    with span("run.end", **{"uws.run.outcome": answer.outcome}):
        return _settle_traced(
            run=run,
            attempt=attempt,
            redis=redis,
            answer=answer,
            cost=cost,
            first_token_at=first_token_at,
        )


def _settle_traced(
    *,
    run: Run,
    attempt: int,
    redis: ScopedRedis,
    answer: Answer,
    cost: dict[str, Any],
    first_token_at,
) -> str:
    outcome, content = answer.outcome, answer.content
    if outcome in ("done", "error"):
        return _end(run=run, attempt=attempt, answer=answer, cost=cost,
                    first_token_at=first_token_at)  # fmt: skip
    if outcome == "waiting":
        return _store_waiting(run=run, attempt=attempt, answer=answer, cost=cost)
    usage_record(**cost)
    if outcome in ("handed-back", "interrupted"):
        # handed-back: the worker is shutting down; interrupted: Redis went away
        # mid-answer, not the agent's failure. Either way the run goes back to queued
        # with its lease released, the recovery pass dispatches it to a worker that runs
        # on (once Redis is back), and its next start tells the client the answer
        # starts over: from the last step whose calls were made, if any (chat.suspend).
        state.run_take_back(
            run=run, from_status=Run.Status.RUNNING, attempt=attempt, suspended=answer.checkpoint
        )
        return outcome
    if outcome == "cancelled":
        # The canceller ends the run (or has); what was said before the cancel stays.
        state.message_partial_keep(run=run, content=content)
    if outcome == "project-deleted":
        # Teardown may have removed the stream before our last events re-created it.
        redis.delete(streams.stream_key(run.session_id), streams.cancel_key(run.message_id))
    return outcome


def _end(*, run: Run, attempt: int, answer: Answer, cost: dict[str, Any], first_token_at) -> str:
    """The run ended done or in error ("lost" if another ended it first); a done
    exchange is remembered, an error raised for the task to record."""
    done = answer.outcome == "done"
    ended = state.run_end(
        run=run,
        status=Run.Status.DONE if done else Run.Status.ERROR,
        content=answer.content,
        error="" if done else answer.error,
        attempt=attempt,
        usage=cost,
        citations=answer.citations if done else None,
        first_token_at=first_token_at,
    )
    if not ended:
        return "lost"
    if not done:
        raise AgentRunFailed(f"run {run.id}: {answer.error}")
    release_database()  # remembering embeds: no connection held meanwhile
    _remember_exchange(
        run=run,
        content=answer.content,
        question=answer.question,
        question_id=answer.question_id,
        question_vector=answer.question_vector,
    )
    return "done"


def _store_waiting(*, run: Run, attempt: int, answer: Answer, cost: dict[str, Any]) -> str:
    """The run stored to wait (chat.suspend): no worker holds it until it is resumed."""
    suspended, event = answer.suspension
    # Kept with it: the resumed run remembers the exchange without embedding again.
    suspended["question_vector"] = answer.question_vector
    waits = (
        settings.RUN_APPROVAL_TIMEOUT_SECONDS
        if suspended["reason"] == "approval"
        else settings.AGENT_CALL_TIMEOUT_SECONDS
    )
    waiting_until = timezone.now() + timedelta(seconds=waits)
    event["waiting_until"] = waiting_until.isoformat()
    stored = state.run_suspend(
        run=run,
        attempt=attempt,
        suspended=suspended,
        steps=answer.steps,
        content=answer.content,
        waiting_until=waiting_until,
        event=event,
        usage=cost,
    )
    if not stored:
        return "lost"
    if suspended["reason"] == "agents":
        # A callee may have ended before its caller was stored: nobody else would
        # resume it then.
        caller_resume_if_answered(run_id=run.id)
    return "waiting"


# --- Answering --------------------------------------------------------------------------


class _Stopper:
    """Whether the run must stop: cancelled or lost (its lease says), its project
    deleted (looked at every TOMBSTONE_CHECK_SECONDS), its worker shutting down, or its
    own time limit reached (Celery's are not enforced in the thread pool)."""

    def __init__(self, *, project_id, held: Held) -> None:
        self.project_id, self.held = project_id, held
        self.next_check = time.monotonic() + TOMBSTONE_CHECK_SECONDS
        self.gone = False
        self.deadline = time.monotonic() + settings.RUN_TIME_LIMIT_SECONDS

    def __call__(self) -> bool:
        if time.monotonic() >= self.next_check:
            self.gone = self.gone or project_gone(self.project_id)
            self.next_check = time.monotonic() + TOMBSTONE_CHECK_SECONDS
        return (
            self.gone
            or self.held.should_stop
            or worker_stopping()
            or time.monotonic() >= self.deadline
        )

    def stopped(self, content: str) -> Answer:
        if self.gone:
            return Answer("project-deleted", content)
        if self.held.should_stop:
            return Answer("cancelled" if self.held.cancelled.is_set() else "lost", content)
        if time.monotonic() >= self.deadline:
            limit = settings.RUN_TIME_LIMIT_SECONDS
            return Answer("error", content, f"the agent run reached its time limit ({limit:g}s)")
        return Answer("handed-back" if worker_stopping() else "lost", content)


def _answer(*, run: Run, held: Held, space, redis: ScopedRedis, usage: Usage) -> Answer:
    stop = _Stopper(project_id=run.session.project_id, held=held)
    parts: list[str] = []
    loop = question_vector = None
    try:
        prepared = _prepare(run=run, space=space)
        if prepared is None:
            return Answer("error", error="the agent no longer exists")
        question = prepared.question
        tools = tools_expand(prepared.tools, redis=redis, secrets=prepared.secrets)
        resumed = run.suspended or None
        question_vector = _question_vector(run=run, question=question, resumed=resumed)
        # A resumed run goes on with the conversation it was stored with (context included).
        context, citations = (
            ([], [])
            if resumed
            else _context(
                run=run, space=space, prepared=prepared, tools=tools, vector=question_vector
            )
        )
        request = _build_request(
            config=prepared.config,
            history=prepared.history,
            question=question,
            context=context,
            tools=tools,
            memory=prepared.memory,
        )
        request = replace(request, deadline=stop.deadline)
        if resumed:
            request = _resumed_request(request, run=run, resumed=resumed, redis=redis, parts=parts)
        loop = _tool_loop(
            run=run, space=space, prepared=prepared, tools=tools, redis=redis, stop=stop,
            usage=usage,
        )  # fmt: skip
        outcome = loop.run(request=request, parts=parts, resumed=resumed)
    except ProviderStopped:
        return _given_back(stop.stopped("".join(parts)), loop, question_vector)
    except ProviderError as exc:
        if stop():  # e.g. its call timed out at the run's deadline: say why
            return _given_back(stop.stopped("".join(parts)), loop, question_vector)
        return Answer("error", "".join(parts), str(exc))
    except RedisError as exc:
        logger.warning("agent run %s interrupted, Redis unavailable: %r", run.id, exc)
        return _given_back(Answer("interrupted", "".join(parts)), loop, question_vector)
    except Exception as exc:
        logger.exception("agent run %s failed", run.id)
        return Answer("error", "".join(parts), f"the agent run failed: {type(exc).__name__}")
    answer = _loop_answer(outcome, "".join(parts), loop=loop, stop=stop, question=question,
                          question_vector=question_vector)  # fmt: skip
    # What the answer drew on: the chunks it was given, then what its searches found.
    answer.question_id = prepared.question_id
    answer.citations = citations + [
        {"index": None, **hit}
        for step in loop.steps
        if step.get("status") == "done"
        for hit in step.get("citations") or ()
    ]
    return answer


def _question_vector(*, run: Run, question: str, resumed: dict | None) -> list[float] | None:
    """The question embedded once: to search now (unless the agent searches by tool),
    and to remember the exchange by afterwards. A resumed run kept the one it had."""
    with span("context.embed_query"):
        if resumed and resumed.get("question_vector"):
            return resumed["question_vector"]
        if not question.strip():
            return None
        return query_embed(question, project_id=run.session.project_id)


def _resumed_request(
    request: ChatRequest, *, run: Run, resumed: dict, redis: ScopedRedis, parts: list[str]
) -> ChatRequest:
    """The conversation as the model had it when the run waited, context included; what
    the answer had said by then is its first part (sent again to a client that was told
    the answer starts over)."""
    if resumed["content"]:
        parts.append(resumed["content"])
        if run.starts > 1:  # after message.restarted: the client gets it again
            streams.event_append(
                redis=redis,
                session_id=run.session_id,
                event_type=streams.MESSAGE_DELTA,
                data={"message_id": run.message_id, "delta": resumed["content"], "offset": 0},
            )
    return replace(request, messages=list(resumed["messages"]))


def _tool_loop(
    *,
    run: Run,
    space,
    prepared: Prepared,
    tools: list[ToolSpec],
    redis: ScopedRedis,
    stop: _Stopper,
    usage: Usage,
) -> ToolLoop:
    """The loop that answers: provider turns and the agent's tool calls, in the run's
    scope (its user, project, agent, secrets and deadline)."""
    params = dict(prepared.config.get("params") or {})
    return ToolLoop(
        redis=redis,
        run=run,
        tools=tools,
        scope=ToolScope(
            user_id=space.user_id,
            project_id=run.session.project_id,
            agent_id=prepared.config["id"],
            secrets=prepared.secrets,
            run_id=str(run.id),
            should_stop=stop,
            deadline=stop.deadline,
            params=params,
        ),
        max_steps=int(params.get("max_steps", settings.TOOL_MAX_STEPS)),
        stop=stop,
        usage=usage,
        llm=prepared.llm,
    )


def _prepare(*, run: Run, space) -> Prepared | None:
    """The agent's config (None: it no longer exists), the conversation, its tools and
    the project's secrets and provider settings; then the database connection goes."""
    config = space.get_agent(str(run.agent_id))
    if config is None:
        return None
    history, question_id = conversation(run)
    pinned = _pinned_version(run)
    if pinned is None:
        tools = agent_tools(agent_id=run.agent_id)
    else:  # the session keeps to a version: its prompt, model, parameters and tools
        config = {**config, **{f: getattr(pinned, f) for f in ("system_prompt", "model", "params")}}
        tools = agent_tools(agent_id=run.agent_id, rows=version_tool_rows(pinned))
    project_id = run.session.project_id
    secrets = project_secrets(project_id=project_id) if _uses_secrets(tools) else {}
    # Governance hook: the project's own provider settings, over the deployment's.
    llm = provider_settings_for(project_id=project_id)
    state.run_model_set(run=run, model=_model_name(config, llm))
    memory = memory_blocks_prompt(agent_id=run.agent_id)
    # Nothing more from the database until the run ends, but the run's steps (the
    # lease keeper has its own connection).
    release_database()
    question = next((c for role, c in reversed(history) if role == Message.Role.USER), "")
    return Prepared(
        config=config,
        history=history,
        question=question,
        question_id=question_id,
        tools=tools,
        secrets=secrets,
        llm=llm,
        memory=memory,
    )


def _context(
    *, run: Run, space, prepared: Prepared, tools: list[ToolSpec], vector: list[float] | None
) -> tuple[list[str], list[dict[str, Any]]]:
    """The context passages given with the question, and their citations: none for an
    agent with the search tool (it searches when it decides to), else the top_k best.
    A file's chunk is shown with its source, page and section, so the model can cite."""
    searches = any(t.kind == "builtin" and t.name == "search_context" for t in tools)
    params = prepared.config.get("params") or {}
    k = 0 if searches else int(params.get("top_k", DEFAULT_TOP_K))
    with span("context.retrieval", **{"uws.retrieval.k": k}) as s:
        hits = context_search(
            user_id=space.user_id,
            project_id=run.session.project_id,
            agent_id=prepared.config["id"],
            query=prepared.question,
            k=k,
            vector=vector,
            mode=agent_search_mode(params),
        )
        s.set_attribute("uws.retrieval.hits", len(hits))
    texts, citations = [], []
    for index, hit in enumerate(hits, start=1):
        where = citation(hit)
        label = ", ".join(
            f"{key} {where[key]}" for key in ("source", "page", "section") if key in where
        )
        texts.append(f"({label}) {hit.text}" if label else hit.text)
        citations.append({"index": index, "id": hit.id, "score": round(hit.score, 4), **where})
    return texts, citations


def _loop_answer(
    outcome: str,
    content: str,
    *,
    loop: ToolLoop,
    stop: _Stopper,
    question: str,
    question_vector: list[float] | None,
) -> Answer:
    if outcome == "cancelled":
        return Answer("cancelled", content)
    if outcome == "waiting":
        return Answer(
            "waiting",
            content,
            question=question,
            question_vector=question_vector,
            suspension=loop.suspension,
            steps=loop.steps,
        )
    if outcome == "step-limit":
        return Answer(
            "error",
            content,
            f"the agent reached its step limit ({loop.max_steps}) without an answer",
        )
    if outcome != "done":
        return _given_back(stop.stopped(content), loop, question_vector)
    return Answer("done", content, question=question, question_vector=question_vector)


def _given_back(
    answer: Answer, loop: ToolLoop | None, question_vector: list[float] | None
) -> Answer:
    """A run given back to the queue keeps where its tool loop got to (the last step
    whose calls were made), to go on from there."""
    if answer.outcome in ("handed-back", "interrupted") and loop and loop.checkpoint:
        # Kept with it: the next start remembers the exchange without embedding again.
        answer.checkpoint = {**loop.checkpoint, "question_vector": question_vector}
    return answer


def conversation(run: Run) -> tuple[list[tuple[str, str]], int | None]:
    """The (role, content) pairs the run's answer follows, oldest first: the user's
    messages and the finished answers, at most HISTORY_MESSAGES + 1 of them; and the id
    of the last user message among them (the question), or None."""
    rows = list(
        Message.objects.filter(session_id=run.session_id, id__lt=run.message_id)
        .filter(Q(role=Message.Role.USER) | Q(role=Message.Role.ASSISTANT, status="done"))
        .order_by("-id")
        .values_list("id", "role", "content")[: HISTORY_MESSAGES + 1]
    )
    asked = next((id_ for id_, role, _ in rows if role == Message.Role.USER), None)
    return [(role, content) for _, role, content in reversed(rows)], asked


def _build_request(
    *,
    config: dict[str, Any],
    history: list[tuple[str, str]],
    question: str,
    context: list[str],
    tools: list[ToolSpec] = (),
    memory: str = "",
) -> ChatRequest:
    system = config.get("system_prompt") or "You are a helpful assistant."
    if memory:
        system = f"{system}\n\n{memory}"
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


def _pinned_version(run: Run) -> AgentVersion | None:
    """The version the run's session pins, when the run answers with it."""
    if run.agent_version_id is None or run.session.agent_version_id != run.agent_version_id:
        return None
    return AgentVersion.objects.filter(id=run.agent_version_id).first()


def _uses_secrets(tools: list[ToolSpec]) -> bool:
    # A call waiting for approval is shown (event, admin) scrubbed of them.
    return any(tool.headers or tool.requires_approval for tool in tools)


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


def _redis_of(run: Run) -> ScopedRedis:
    project = run.session.project
    return scoped(project.owner_id, project.id)


def _remember_exchange(
    *,
    run: Run,
    content: str,
    question: str,
    question_id: int | None,
    question_vector: list[float] | None,
) -> None:
    if not content.strip() or not question.strip():
        return
    project = run.session.project
    agent = {"user_id": project.owner_id, "project_id": project.id, "agent_id": str(run.agent_id)}
    # The answer's event is out already: a client may delete the project at once. Its
    # teardown tombstones it before removing its vectors, so a write seen after that is
    # skipped, and a write that raced the teardown is taken back once the tombstone
    # shows: either the teardown's removal came after the write, or the check after it
    # sees the tombstone, which is set before that removal.
    if project_gone(project.id):
        return
    try:
        # What regenerate replaced is out of the conversation: out of memory too, or
        # the replaced answer would keep coming back as the nearest context.
        exchanges_forget(**agent, question=question, answers=_replaced_answers(run, question_id))
        exchange_store(
            **agent,
            question=question,
            answer=content,
            payload={"session_id": str(run.session_id), "message_id": run.message_id},
            question_vector=question_vector,
        )
        if project_gone(project.id):
            exchanges_forget(**agent, question=question, answers=[content])
    except Exception:
        # The answer stands; only the memory of it is missing.
        logger.exception("could not add the exchange of run %s to context", run.id)


def _replaced_answers(run: Run, question_id: int | None) -> list[str]:
    """The answers regenerate replaced with this run's: superseded, between the question
    (`question_id`) and this answer. Not looked for when no message lies between them
    (the answer was stored with its question: no regenerate)."""
    if question_id is None or question_id + 1 == run.message_id:
        return []
    return list(
        Message.objects.filter(
            session_id=run.session_id,
            role=Message.Role.ASSISTANT,
            status=Message.Status.SUPERSEDED,
            id__gt=question_id,
            id__lt=run.message_id,
        ).values_list("content", flat=True)
    )
