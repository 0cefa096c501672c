"""The worker side of context requests: ingest and clear jobs (status readable at
…/context/jobs/{id}/) and searches a web request is waiting for."""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from django.conf import settings

from agentbus import project_gone
from agents.models import Agent
from common.disk import disk_space_problem
from governance.usage import embedding_usage_record
from realtime import replies
from workspaces.redis import scoped

from . import job_records
from .embeddings import get_embedder
from .vectors import citation, collection_drop, context_clear, context_search, documents_store

logger = logging.getLogger(__name__)


def _agent_exists(*, project_id: uuid.UUID | str, agent_id: str) -> bool:
    return Agent.objects.filter(id=agent_id, project_id=project_id).exists()


def context_job_add(
    *, user_id: int, project_id: uuid.UUID | str, agent_id: str, job_id: str, start: int
) -> int | None:
    """Store one batch of a job's documents, from `start`; returns where the next batch
    starts, or None when the job has ended.

    Batches are short (at most INGEST_BATCH_DOCUMENTS documents, INGEST_BATCH_CHARS of
    text), so a long ingest gives the worker back between them (other projects' work
    runs first) and stops soon after its project is deleted.
    """
    redis = scoped(user_id, project_id)
    job = job_records.job_get(redis=redis, job_id=job_id)
    if job is None or job.get("status") in ("done", "error"):
        return None  # gone with its workspace, or already ended
    if int(job.get("stored_documents", 0)) > start:
        return int(job["stored_documents"])  # a redelivered batch: already stored
    if not _agent_exists(project_id=project_id, agent_id=agent_id):
        job_records.job_finish(
            redis=redis,
            job_id=job_id,
            fields={"status": "error", "error": "the agent no longer exists"},
        )
        return None
    documents = job_records.job_documents(
        redis=redis, job_id=job_id, start=start, count=settings.INGEST_BATCH_DOCUMENTS
    )
    batch, chars = [], 0
    for document in documents:
        if batch and chars + len(document["text"]) > settings.INGEST_BATCH_CHARS:
            break
        batch.append(document)
        chars += len(document["text"])
    full = None if settings.QDRANT_URL else disk_space_problem(settings.QDRANT_PATH)
    if full:
        # Ended, not raised: a redelivered batch would fill the volume again (and the
        # embedded engine dies of a full volume mid-write, taking the worker with it).
        job_records.job_finish(
            redis=redis, job_id=job_id, fields={"status": "error", "error": f"not stored: {full}"}
        )
        return None
    if start == 0:
        job_records.job_update(redis=redis, job_id=job_id, fields={"status": "running"})
    started = time.perf_counter()
    try:
        chunks = documents_store(
            user_id=user_id,
            project_id=project_id,
            agent_id=agent_id,
            documents=batch,
            first_index=start,
            extra_payload={"kind": "document", "job_id": job_id},
            should_stop=lambda: project_gone(project_id),
        )
    except Exception as exc:
        logger.exception("context job %s failed", job_id)
        job_records.job_finish(
            redis=redis,
            job_id=job_id,
            fields={"status": "error", "error": f"storing failed: {type(exc).__name__}: {exc}"},
        )
        return None
    if chunks is None:
        return None  # the project was deleted: its teardown removes the rest
    # Governance hook: the tokens this batch embedded.
    embedding_usage_record(
        project_id=project_id,
        user_id=user_id,
        agent_id=agent_id,
        job_id=job_id,
        batch_start=start,
        texts=[document["text"] for document in batch],
        model=get_embedder().name,
    )
    stored = start + len(batch)
    progress = {
        "stored_documents": stored,
        "chunks": int(job.get("chunks", 0)) + chunks,
        "seconds": round(float(job.get("seconds", 0)) + time.perf_counter() - started, 4),
    }
    if stored >= int(job.get("documents", 0)) or not batch:
        job_records.job_finish(
            redis=redis,
            job_id=job_id,
            fields={**progress, "status": "done", "finished_at": time.time()},
        )
        return None
    job_records.job_update(redis=redis, job_id=job_id, fields=progress)
    return stored


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
    job_records.job_finish(
        redis=redis, job_id=job_id, fields={**result, "finished_at": time.time()}
    )
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
    mode: str = "dense",
) -> str:
    """Search for a waiting web request and answer on its reply key (skip if it gave up)."""
    if time.time() > deadline:
        return "expired"
    redis = scoped(user_id, project_id)
    try:
        hits = context_search(
            user_id=user_id, project_id=project_id, agent_id=agent_id, query=query, k=k, mode=mode
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
                    **citation(h),
                }
                for h in hits
            ]
        }
    replies.reply_send(redis=redis, request_id=request_id, payload=payload)
    if project_gone(project_id):
        # Nobody may wait on a deleted project; leave no key behind its teardown.
        redis.delete(replies.reply_key(request_id))
    return "answered"
