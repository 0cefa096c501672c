"""Writes of agents, sessions and messages, and the requests that put agent work on the
project's bus (chat runs, context jobs and searches)."""

from __future__ import annotations

import time
import uuid
from typing import Any

from celery import Task
from django.db import transaction

from agentbus import publish
from common.services import model_update, on_commit_robust
from projects.models import Project
from workspaces.manager import get_worker_space
from workspaces.redis import scoped
from workspaces.services import workspace_agent_sync_on_commit

from .models import Agent, ChatSession, Message
from .runtime import streams
from .runtime.chat import CANCELLED, message_event_data, message_fail
from .tasks import add_context, clear_context, drop_collection, run_agent, search_context

AGENT_FIELDS = ("name", "system_prompt", "model", "params")


def agent_create(
    *,
    project: Project,
    name: str,
    system_prompt: str = "",
    model: str = "",
    params: dict[str, Any] | None = None,
) -> Agent:
    agent = Agent.objects.create(
        project=project, name=name, system_prompt=system_prompt, model=model, params=params or {}
    )
    # The workspace's AgentCache follows the committed row.
    workspace_agent_sync_on_commit(project_id=project.id, agent_id=agent.id)
    return agent


def agent_update(*, agent: Agent, data: dict[str, Any]) -> Agent:
    agent, changed = model_update(instance=agent, fields=AGENT_FIELDS, data=data)
    if changed:
        workspace_agent_sync_on_commit(project_id=agent.project_id, agent_id=agent.id)
    return agent


@transaction.atomic
def agent_delete(*, agent: Agent) -> None:
    project = agent.project
    agent_id = agent.id
    agent.delete()
    workspace_agent_sync_on_commit(project_id=project.id, agent_id=agent_id)
    # Its context goes too; if this is lost, the collections sweep finds the stray.
    on_commit_robust(
        lambda: publish(
            drop_collection,
            project_id=project.id,
            kwargs={"user_id": project.owner_id, "agent_id": str(agent_id)},
        ),
        name=f"drop_collection(agent={agent_id})",
    )


def session_create(*, project: Project, agent: Agent, title: str = "") -> ChatSession:
    if agent.project_id != project.id:
        raise ValueError("the agent belongs to another project")
    return ChatSession.objects.create(project=project, agent=agent, title=title)


def session_delete(*, session: ChatSession) -> None:
    user_id, project_id, session_id = session.project.owner_id, session.project_id, session.id
    session.delete()
    # The session's event stream goes with it (teardown takes it only with the project).
    on_commit_robust(
        lambda: streams.stream_delete(redis=scoped(user_id, project_id), session_id=session_id),
        name=f"stream_delete(session={session_id})",
    )


# --- Chat: a message, its answer, cancelling ------------------------------------------


@transaction.atomic
def message_create(*, session: ChatSession, content: str) -> tuple[Message, Message]:
    """Store a user's message and the (pending) assistant message that will answer it.

    After commit, both are announced on the session's event stream and the agent run is
    put on the project's bus. Returns (user message, assistant message).
    """
    user_message = Message.objects.create(
        session=session, role=Message.Role.USER, content=content, status=Message.Status.DONE
    )
    assistant_message = Message.objects.create(
        session=session, role=Message.Role.ASSISTANT, status=Message.Status.PENDING
    )
    user_id = session.project.owner_id
    transaction.on_commit(
        lambda: _chat_run_dispatch(
            user_id=user_id, user_message=user_message, assistant_message=assistant_message
        )
    )
    return user_message, assistant_message


def _chat_run_dispatch(*, user_id: int, user_message: Message, assistant_message: Message) -> None:
    project_id = assistant_message.session.project_id
    space = get_worker_space(user_id=user_id, project_id=project_id)
    with space.use():
        # Announce first, so a client sees the message before the worker's first delta.
        streams.events_append(
            redis=space.redis,
            session_id=assistant_message.session_id,
            events=[
                (streams.MESSAGE_CREATED, message_event_data(message))
                for message in (user_message, assistant_message)
            ],
        )
        try:
            publish(
                run_agent,
                project_id=project_id,
                kwargs={
                    "user_id": user_id,
                    "session_id": str(assistant_message.session_id),
                    "message_id": assistant_message.id,
                },
            )
        except Exception:
            # Nothing will answer: say so on the message instead of leaving it pending.
            Message.objects.filter(id=assistant_message.id, status=Message.Status.PENDING).update(
                status=Message.Status.ERROR, error="the agent run could not be queued"
            )
            raise


def session_runs_cancel(*, session: ChatSession) -> list[int]:
    """Stop the session's in-flight answers; returns the ids of the messages cancelled.

    A run not started yet ends here; a streaming one sees the cancel flag before its next
    delta and ends itself.
    """
    in_flight = list(
        Message.objects.filter(
            session=session,
            role=Message.Role.ASSISTANT,
            status__in=(Message.Status.PENDING, Message.Status.STREAMING),
        ).values_list("id", flat=True)
    )
    if not in_flight:
        return []
    redis = scoped(session.project.owner_id, session.project_id)
    # The flag goes first: a run claiming its message after this sees it.
    streams.cancel_request(redis=redis, message_ids=in_flight)
    for message in Message.objects.filter(id__in=in_flight, status=Message.Status.PENDING):
        message_fail(
            redis=redis,
            message=message,
            reason=CANCELLED,
            from_statuses=(Message.Status.PENDING,),
        )
    return in_flight


# --- The agent's context ----------------------------------------------------------------


def context_documents_add(*, agent: Agent, documents: list[dict[str, Any]]) -> str:
    """Queue documents ({"text", "metadata"?}) for the agent's context; returns the job id."""
    return _context_job_start(
        agent=agent,
        task=add_context,
        kind="add",
        fields={"documents": len(documents)},
        kwargs={"documents": documents},
    )


def context_clear(*, agent: Agent) -> str:
    """Queue forgetting everything in the agent's context; returns the job id."""
    return _context_job_start(agent=agent, task=clear_context, kind="clear")


def _context_job_start(
    *, agent: Agent, task: Task, kind: str, fields: dict | None = None, kwargs: dict | None = None
) -> str:
    """Record a context job (readable at .../context/jobs/{id}/) and put it on the bus."""
    project = agent.project
    job_id = str(uuid.uuid4())
    streams.job_create(
        redis=scoped(project.owner_id, project.id),
        job_id=job_id,
        fields={
            "id": job_id,
            "kind": kind,
            "agent_id": str(agent.id),
            "status": "queued",
            "created_at": time.time(),
            **(fields or {}),
        },
    )
    publish(
        task,
        project_id=project.id,
        kwargs={
            "user_id": project.owner_id,
            "agent_id": str(agent.id),
            "job_id": job_id,
            **(kwargs or {}),
        },
    )
    return job_id


class ContextUnavailable(Exception):
    """No worker answered a context search in time, or the store failed."""


def context_search(*, agent: Agent, query: str, k: int, timeout: float) -> list[dict[str, Any]]:
    """Search the agent's context. The vector store lives on workers, so the search runs as
    a task on the project's bus and this waits (at most `timeout` seconds) for its answer."""
    project = agent.project
    request_id = str(uuid.uuid4())
    publish(
        search_context,
        project_id=project.id,
        kwargs={
            "user_id": project.owner_id,
            "agent_id": str(agent.id),
            "request_id": request_id,
            "query": query,
            "k": k,
            # A worker reaching the task after this gives up: nobody is waiting any more.
            "deadline": time.time() + timeout,
        },
    )
    answer = streams.reply_wait(
        redis=scoped(project.owner_id, project.id), request_id=request_id, timeout=timeout
    )
    if answer is None:
        raise ContextUnavailable(f"no worker answered within {timeout:g}s")
    if "error" in answer:
        raise ContextUnavailable(f"the context store failed: {answer['error']}")
    return answer["results"]
