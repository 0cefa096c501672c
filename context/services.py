"""Requests that put context work on the project's bus: ingest and clear jobs, and the
pieces of a search that a waiting web request (context.waits) puts together."""

from __future__ import annotations

import contextlib
import time
import uuid
from typing import Any

from celery import Task
from django.conf import settings
from django.db import transaction
from rest_framework.exceptions import Throttled

from agentbus import publish
from agents.models import Agent
from workspaces.redis import scoped

from .chunking import document_point_keys
from .filetypes import content_hash
from .job_records import file_ingest_failed, job_create, job_discard, job_file_put
from .models import ContextDocument
from .sparse import agent_search_mode
from .tasks import add_context, clear_context, forget_document, ingest_file


def context_documents_add(*, agent: Agent, documents: list[dict[str, Any]]) -> str:
    """Queue documents ({"text", "metadata"?}) for the agent's context; returns the job id."""
    return _context_job_start(
        agent=agent,
        task=add_context,
        kind="add",
        fields={"documents": len(documents)},
        documents=documents,
    )


def context_clear_enqueue(*, agent: Agent) -> str:
    """Queue forgetting everything in the agent's context (the job's task calls
    context.vectors.context_clear on a worker); returns the job id."""
    return _context_job_start(agent=agent, task=clear_context, kind="clear")


def _context_job_start(
    *,
    agent: Agent,
    task: Task,
    kind: str,
    fields: dict | None = None,
    documents: list[dict[str, Any]] | None = None,
) -> str:
    """Record a context job (readable at .../context/jobs/{id}/) and put it on the bus.
    Both need Redis: while it is down this raises (a 503), having written nothing."""
    project = agent.project
    job_id = str(uuid.uuid4())
    kwargs = {"user_id": project.owner_id, "agent_id": str(agent.id), "job_id": job_id}
    if kind == "add":
        kwargs["start"] = 0
    # Step by step (an ingest's batches; a clear is one step): context.recovery sends a
    # lost step again.
    redis = scoped(project.owner_id, project.id)
    token = job_create(
        redis=redis,
        job_id=job_id,
        fields={
            "id": job_id,
            "kind": kind,
            "agent_id": str(agent.id),
            "status": "queued",
            "created_at": time.time(),
            **(fields or {}),
        },
        documents=documents,
        step=(task.name, kwargs),
    )
    try:
        publish(task, project_id=project.id, kwargs={**kwargs, "step": token})
    except Exception:
        with contextlib.suppress(Exception):  # with Redis, or the job: a 503 leaves none
            job_discard(redis=redis, job_id=job_id)
        raise
    return job_id


class ContextUnavailable(Exception):
    """No worker answered a context search in time, or the store failed."""


class TooManySearches(Throttled):
    default_detail = "Too many context searches in flight for this user or project."


def search_limits() -> list[int]:
    return [
        settings.SEARCH_INFLIGHT_PER_USER,
        settings.SEARCH_INFLIGHT_PER_PROJECT,
        int(2 * settings.CONTEXT_SEARCH_TIMEOUT_SECONDS) + 5,
    ]


def context_search_task_kwargs(
    *, agent: Agent, request_id: str, query: str, k: int, timeout: float, mode: str = ""
) -> dict:
    project = agent.project
    return {
        # "" is the agent's own search mode (its params' search_mode).
        "mode": mode or agent_search_mode(agent.params),
        "user_id": project.owner_id,
        "agent_id": str(agent.id),
        "request_id": request_id,
        "query": query,
        "k": k,
        # A worker reaching the task after this gives up: nobody is waiting any more.
        "deadline": time.time() + timeout,
    }


def search_answer(answer: dict | None, *, timeout: float) -> list[dict[str, Any]]:
    if answer is None:
        raise ContextUnavailable(f"no worker answered within {timeout:g}s")
    if "error" in answer:
        raise ContextUnavailable(f"the context store failed: {answer['error']}")
    return answer["results"]


# --- Files ---------------------------------------------------------------------------


def context_file_add(
    *,
    agent: Agent,
    source: str,
    data: bytes | None = None,
    file_type: str = "",
    url: str = "",
) -> tuple[ContextDocument, bool]:
    """Queue a file (its bytes, or a URL a worker fetches through the egress guard) for
    the agent's context. Returns (document, queued): the same bytes already ingested, or
    being ingested, for this agent are that document, and nothing is added (False). If
    that document failed (job_records.file_ingest_failed: an error, a job lost with
    Redis), it is queued again, under its id.

    The document row and the job's record (with the bytes) are written together, and
    the job goes on the project's bus after commit, as every context job does: Redis
    down is a 503 with nothing written."""
    project = agent.project
    redis = scoped(project.owner_id, project.id)
    digest = content_hash(data) if data is not None else ""
    twin = None
    if digest:
        twin = ContextDocument.objects.filter(agent=agent, content_hash=digest).first()
        if twin is not None and not _failed(redis, twin):
            return twin, False
    job_id = str(uuid.uuid4())
    fields = {"source": source[:500], "file_type": file_type, "content_hash": digest,
              "size_bytes": len(data) if data is not None else 0, "job_id": job_id}  # fmt: skip
    with transaction.atomic():
        if twin is not None:
            twin = ContextDocument.objects.select_for_update().filter(id=twin.id).first()
        if twin is None:
            document = ContextDocument.objects.create(agent=agent, **fields)
        elif not _failed(redis, twin):
            return twin, False  # queued again by a request that came first
        else:
            document = twin
            fields |= {"status": ContextDocument.Status.QUEUED, "error": "", "chunks": 0,
                       "pages": None, "text": ""}  # fmt: skip
            for name, value in fields.items():
                setattr(document, name, value)
            document.save(update_fields=[*fields, "updated_at"])
        kwargs = {
            "user_id": project.owner_id,
            "agent_id": str(agent.id),
            "job_id": job_id,
            "document_id": str(document.id),
        }
        token = job_create(
            redis=redis,
            job_id=job_id,
            fields={
                "id": job_id,
                "kind": "file",
                "agent_id": str(agent.id),
                "document_id": str(document.id),
                "status": "queued",
                "created_at": time.time(),
            },
            step=(ingest_file.name, kwargs),
        )
        job_file_put(redis=redis, job_id=job_id, data=data, url=url)
        transaction.on_commit(
            lambda: publish(ingest_file, project_id=project.id, kwargs={**kwargs, "step": token})
        )
    return document, True


def _failed(redis, document: ContextDocument) -> bool:
    return file_ingest_failed(redis=redis, status=document.status, job_id=document.job_id)


def context_document_delete(*, document: ContextDocument) -> None:
    """Delete a document and, on a worker after commit, exactly its points."""
    agent = document.agent
    project = agent.project
    keys = document_point_keys(document_id=document.id, chunks=document.chunks)
    with transaction.atomic():
        ContextDocument.objects.filter(id=document.id).delete()
        if keys:
            kwargs = {"user_id": project.owner_id, "agent_id": str(agent.id), "keys": keys}
            transaction.on_commit(
                lambda: publish(forget_document, project_id=project.id, kwargs=kwargs)
            )
