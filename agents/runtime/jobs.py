"""The worker side of context requests: ingest and clear jobs (status readable at
…/context/jobs/{id}/) and searches a web request is waiting for."""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from agentbus import project_gone
from workspaces.redis import scoped

from ..models import Agent
from . import streams
from .vectors import collection_drop, context_clear, context_search, documents_store

logger = logging.getLogger(__name__)


def _agent_exists(*, project_id: uuid.UUID | str, agent_id: str) -> bool:
    return Agent.objects.filter(id=agent_id, project_id=project_id).exists()


def context_job_add(
    *,
    user_id: int,
    project_id: uuid.UUID | str,
    agent_id: str,
    job_id: str,
    documents: list[dict[str, Any]],
) -> dict[str, Any]:
    """Store documents for an agent and record the outcome on the job."""
    redis = scoped(user_id, project_id)
    if not _agent_exists(project_id=project_id, agent_id=agent_id):
        result = {"status": "error", "error": "the agent no longer exists"}
    else:
        streams.job_update(redis=redis, job_id=job_id, fields={"status": "running"})
        started = time.perf_counter()
        try:
            chunks = documents_store(
                user_id=user_id,
                project_id=project_id,
                agent_id=agent_id,
                documents=documents,
                extra_payload={"kind": "document", "job_id": job_id},
            )
        except Exception as exc:
            logger.exception("context job %s failed", job_id)
            result = {"status": "error", "error": f"storing failed: {type(exc).__name__}: {exc}"}
        else:
            result = {
                "status": "done",
                "chunks": chunks,
                "seconds": round(time.perf_counter() - started, 4),
            }
    streams.job_update(redis=redis, job_id=job_id, fields={**result, "finished_at": time.time()})
    return result


def context_job_clear(
    *, user_id: int, project_id: uuid.UUID | str, agent_id: str, job_id: str
) -> dict[str, Any]:
    redis = scoped(user_id, project_id)
    if not _agent_exists(project_id=project_id, agent_id=agent_id):
        # Nothing to keep for a deleted agent: its collection goes entirely.
        collection_drop(user_id=user_id, project_id=project_id, agent_id=agent_id)
        result = {"status": "error", "error": "the agent no longer exists"}
    else:
        context_clear(user_id=user_id, project_id=project_id, agent_id=agent_id)
        result = {"status": "done"}
    streams.job_update(redis=redis, job_id=job_id, fields={**result, "finished_at": time.time()})
    return result


def context_search_reply(
    *,
    user_id: int,
    project_id: uuid.UUID | str,
    agent_id: str,
    request_id: str,
    query: str,
    k: int,
    deadline: float,
) -> str:
    """Search for a waiting web request and answer on its reply key (skip if it gave up)."""
    if time.time() > deadline:
        return "expired"
    redis = scoped(user_id, project_id)
    try:
        hits = context_search(
            user_id=user_id, project_id=project_id, agent_id=agent_id, query=query, k=k
        )
    except Exception as exc:
        logger.exception("context search for request %s failed", request_id)
        payload: dict[str, Any] = {"error": f"{type(exc).__name__}: {exc}"}
    else:
        payload = {
            "results": [
                {
                    "id": h.id,
                    "score": h.score,
                    "text": h.text,
                    "kind": h.payload.get("kind", "document"),
                    "metadata": h.payload.get("metadata") or {},
                }
                for h in hits
            ]
        }
    streams.reply_send(redis=redis, request_id=request_id, payload=payload)
    if project_gone(project_id):
        # Nobody may wait on a deleted project; leave no key behind its teardown.
        redis.delete(streams.reply_key(request_id))
    return "answered"
