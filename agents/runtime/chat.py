"""An agent answering one chat message, on a worker.

The assistant `Message` goes pending -> streaming -> done (or error, with the reason),
and every step is an event on the session's stream. Each transition is a conditional
update, so a redelivered task, a cancel racing the run and a deleted row all end in a
single consistent outcome.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from django.db.models import Q

from agentbus import project_gone
from workspaces.manager import get_worker_space
from workspaces.redis import ScopedRedis, scoped

from ..models import Message
from . import streams
from .providers import ChatRequest, ProviderError, get_provider
from .vectors import context_search, exchange_store

logger = logging.getLogger(__name__)

DEFAULT_TOP_K = 4
HISTORY_MESSAGES = 20
CANCELLED = "cancelled"
# How often a long run looks whether its project was deleted meanwhile.
TOMBSTONE_CHECK_SECONDS = 0.5


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


def message_fail(
    *, redis: ScopedRedis, message: Message, reason: str, from_statuses: tuple[str, ...]
) -> bool:
    """End a message in error (once); True when this call was the one that ended it."""
    updated = Message.objects.filter(id=message.id, status__in=from_statuses).update(
        status=Message.Status.ERROR, error=reason, content=message.content
    )
    if updated:
        streams.event_append(
            redis=redis,
            session_id=message.session_id,
            event_type=streams.MESSAGE_ERROR,
            data={"message_id": message.id, "error": reason, "content": message.content},
        )
    return bool(updated)


def _build_request(
    *, config: dict[str, Any], message: Message, question: str, context: list[str]
) -> ChatRequest:
    history = list(
        Message.objects.filter(session_id=message.session_id, id__lt=message.id)
        .filter(Q(role=Message.Role.USER) | Q(role=Message.Role.ASSISTANT, status="done"))
        .order_by("-id")
        .values_list("role", "content")[: HISTORY_MESSAGES + 1]
    )
    history.reverse()
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
    )


def chat_run(
    *, user_id: int, project_id: uuid.UUID | str, session_id: uuid.UUID | str, message_id: int
) -> str:
    """Produce the assistant message `message_id`; returns the outcome (for logs and tests)."""
    outcome = _chat_run(
        user_id=user_id, project_id=project_id, session_id=session_id, message_id=message_id
    )
    if outcome != "already-finished" and project_gone(project_id):
        # The project went while this ran: teardown may have removed the stream before
        # our last events re-created it. Leave nothing under its prefix.
        redis = scoped(user_id, project_id)
        redis.delete(streams.stream_key(session_id), streams.cancel_key(message_id))
        return "project-deleted"
    return outcome


def _chat_run(
    *, user_id: int, project_id: uuid.UUID | str, session_id: uuid.UUID | str, message_id: int
) -> str:
    message = (
        Message.objects.filter(id=message_id, session_id=session_id, role=Message.Role.ASSISTANT)
        .select_related("session")
        .first()
    )
    if message is None:
        return "gone"
    if message.status in (Message.Status.DONE, Message.Status.ERROR):
        return "already-finished"
    redis = scoped(user_id, project_id)
    # Claim the run; a redelivery after a crash (status streaming) starts the answer over,
    # and deltas carry their offset so a client replaces what it had.
    claimed = Message.objects.filter(
        id=message.id, status__in=(Message.Status.PENDING, Message.Status.STREAMING)
    ).update(status=Message.Status.STREAMING, content="", error="")
    if not claimed:
        return "already-finished"
    message.status, message.content = Message.Status.STREAMING, ""
    running = (Message.Status.STREAMING,)
    if streams.cancel_requested(redis=redis, message_id=message.id):
        message_fail(redis=redis, message=message, reason=CANCELLED, from_statuses=running)
        return CANCELLED

    try:
        space = get_worker_space(user_id=user_id, project_id=project_id)
        with space.use():
            config = space.get_agent(str(message.session.agent_id))
            if config is None:
                message_fail(
                    redis=redis,
                    message=message,
                    reason="the agent no longer exists",
                    from_statuses=running,
                )
                return "error"
            question = (
                Message.objects.filter(
                    session_id=message.session_id, role=Message.Role.USER, id__lt=message.id
                )
                .order_by("-id")
                .values_list("content", flat=True)
                .first()
            ) or ""
            top_k = int((config.get("params") or {}).get("top_k", DEFAULT_TOP_K))
            hits = context_search(
                user_id=user_id,
                project_id=project_id,
                agent_id=config["id"],
                query=question,
                k=top_k,
            )
            request = _build_request(
                config=config, message=message, question=question, context=[h.text for h in hits]
            )
            outcome = _stream_answer(
                redis=redis, message=message, request=request, project_id=project_id
            )
    except ProviderError as exc:
        message_fail(redis=redis, message=message, reason=str(exc), from_statuses=running)
        return "error"
    except Exception as exc:
        logger.exception("agent run of message %s failed", message.id)
        message_fail(
            redis=redis,
            message=message,
            reason=f"the agent run failed: {type(exc).__name__}",
            from_statuses=running,
        )
        return "error"
    if outcome != "done":
        return outcome

    try:
        _remember_exchange(
            user_id=user_id,
            project_id=project_id,
            agent_id=config["id"],
            message=message,
            question=question,
        )
    except Exception:
        # The answer stands; only the memory of it is missing.
        logger.exception("could not add the exchange of message %s to context", message.id)
    return "done"


def _stream_answer(
    *, redis: ScopedRedis, message: Message, request: ChatRequest, project_id: uuid.UUID | str
) -> str:
    parts: list[str] = []
    offset = 0
    next_tombstone_check = time.monotonic() + TOMBSTONE_CHECK_SECONDS
    deltas = get_provider(request.model).stream(request)
    try:
        for delta in deltas:
            _event_id, cancelled = streams.event_append_checking_cancel(
                redis=redis,
                session_id=message.session_id,
                message_id=message.id,
                event_type=streams.MESSAGE_DELTA,
                data={"message_id": message.id, "delta": delta, "offset": offset},
            )
            parts.append(delta)
            offset += len(delta)
            message.content = "".join(parts)
            if cancelled:
                message_fail(
                    redis=redis,
                    message=message,
                    reason=CANCELLED,
                    from_statuses=(Message.Status.STREAMING,),
                )
                return CANCELLED
            if time.monotonic() >= next_tombstone_check:
                if project_gone(project_id):
                    return "project-deleted"
                next_tombstone_check = time.monotonic() + TOMBSTONE_CHECK_SECONDS
    finally:
        close = getattr(deltas, "close", None)
        if close is not None:
            close()
    content = "".join(parts)
    finished = Message.objects.filter(id=message.id, status=Message.Status.STREAMING).update(
        status=Message.Status.DONE, content=content
    )
    if not finished:
        return "gone"  # deleted or cancelled meanwhile; that path told the stream
    message.content, message.status = content, Message.Status.DONE
    streams.event_append(
        redis=redis,
        session_id=message.session_id,
        event_type=streams.MESSAGE_COMPLETED,
        data={"message_id": message.id, "content": content, "status": message.status},
    )
    return "done"


def _remember_exchange(
    *,
    user_id: int,
    project_id: uuid.UUID | str,
    agent_id: str,
    message: Message,
    question: str,
) -> None:
    if not message.content.strip() or not question.strip():
        return
    exchange_store(
        user_id=user_id,
        project_id=project_id,
        agent_id=agent_id,
        question=question,
        answer=message.content,
        payload={"session_id": str(message.session_id), "message_id": message.id},
    )
