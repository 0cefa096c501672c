"""The worker side of context requests: ingest and clear jobs (status readable at
…/context/jobs/{id}/) and searches a web request is waiting for."""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

import httpx
from django.conf import settings

from agentbus import project_gone
from agents.models import Agent
from common.disk import disk_space_problem
from common.egress import FILES, EgressRefused, guarded_client
from governance.usage import embedding_usage_record
from realtime import replies
from workspaces.redis import scoped

from . import job_records
from .chunking import document_point_key, document_point_keys
from .embeddings import get_embedder
from .files import chunk_sections, parse
from .filetypes import FileRefused, content_hash, file_type
from .job_records import ENDED
from .models import ContextDocument
from .vectors import (
    citation,
    collection_drop,
    context_clear,
    context_search,
    document_points_forget,
    documents_store,
)

logger = logging.getLogger(__name__)


def _agent_exists(*, project_id: uuid.UUID | str, agent_id: str) -> bool:
    return Agent.objects.filter(id=agent_id, project_id=project_id).exists()


def context_job_add(
    *,
    user_id: int,
    project_id: uuid.UUID | str,
    agent_id: str,
    job_id: str,
    start: int,
    step: str = "",
) -> int | None:
    """Store one batch of a job's documents, from `start`; returns where the next batch
    starts, or None when the job has ended (or `step` is no longer the job's step owed:
    the recovery pass sent it again, job_records).

    Batches are short (at most INGEST_BATCH_DOCUMENTS documents, INGEST_BATCH_CHARS of
    text), so a long ingest gives the worker back between them (other projects' work
    runs first) and stops soon after its project is deleted.
    """
    redis = scoped(user_id, project_id)
    job = job_records.job_get(redis=redis, job_id=job_id)
    if job is None or job.get("status") in ENDED or not job_records.step_owed(job, step):
        return None  # gone with its workspace, ended, or its step sent again since
    if int(job.get("stored_documents", 0)) > start:
        return int(job["stored_documents"])  # a redelivered batch: already stored
    if not _job_may_store(
        redis=redis, job=job, user_id=user_id, project_id=project_id, agent_id=agent_id
    ):
        return None
    batch = _batch(
        job_records.job_documents(
            redis=redis, job_id=job_id, start=start, count=settings.INGEST_BATCH_DOCUMENTS
        )
    )
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
        error = f"storing failed: {type(exc).__name__}: {exc}"
        if job.get("document_id"):  # nothing of a file is left half-stored
            _file_job_fail(redis=redis, job=job, user_id=user_id, project_id=project_id,
                           error=error)  # fmt: skip
        else:
            job_records.job_finish(
                redis=redis, job_id=job_id, fields={"status": "error", "error": error}
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
    if stored < int(job.get("documents", 0)) and batch:
        job_records.job_update(redis=redis, job_id=job_id, fields=progress)
        return stored
    if job.get("document_id"):
        ContextDocument.objects.filter(id=job["document_id"]).update(
            status=ContextDocument.Status.READY
        )
    job_records.job_finish(
        redis=redis,
        job_id=job_id,
        fields={**progress, "status": "done", "finished_at": time.time()},
    )
    return None


def _job_may_store(
    *, redis, job: dict[str, Any], user_id: int, project_id: uuid.UUID | str, agent_id: str
) -> bool:
    """Whether the job's next batch may be stored; when not (its agent or document
    deleted, the store's volume full), the job ends in error here."""
    job_id = job["id"]
    if not _agent_exists(project_id=project_id, agent_id=agent_id):
        job_records.job_finish(
            redis=redis,
            job_id=job_id,
            fields={"status": "error", "error": "the agent no longer exists"},
        )
        return False
    if (
        job.get("document_id")
        and not ContextDocument.objects.filter(id=job["document_id"]).exists()
    ):
        # The document was deleted while it was being stored: drop what was stored.
        _file_job_fail(redis=redis, job=job, user_id=user_id, project_id=project_id,
                       error="the document was deleted")  # fmt: skip
        return False
    full = None if settings.QDRANT_URL else disk_space_problem(settings.QDRANT_PATH)
    if full:
        # Ended, not raised: a redelivered batch would fill the volume again (and the
        # embedded engine dies of a full volume mid-write, taking the worker with it).
        job_records.job_finish(
            redis=redis, job_id=job_id, fields={"status": "error", "error": f"not stored: {full}"}
        )
        return False
    return True


def _batch(documents: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The first documents that fit INGEST_BATCH_CHARS (at least one)."""
    batch, chars = [], 0
    for document in documents:
        if batch and chars + len(document["text"]) > settings.INGEST_BATCH_CHARS:
            break
        batch.append(document)
        chars += len(document["text"])
    return batch


def context_job_clear(
    *, user_id: int, project_id: uuid.UUID | str, agent_id: str, job_id: str, step: str = ""
) -> dict[str, Any]:
    """Forget everything the agent holds; once per job: a message of the job given back
    late (after documents were added since) or sent again meanwhile clears nothing."""
    redis = scoped(user_id, project_id)
    job = job_records.job_get(redis=redis, job_id=job_id)
    if job is None or job.get("status") in ENDED or not job_records.step_owed(job, step):
        return {"status": (job or {}).get("status", "gone")}
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


# --- Files ---------------------------------------------------------------------------


def _file_job_fail(
    *, redis, job: dict[str, Any], user_id: int, project_id: uuid.UUID | str, error: str
) -> None:
    """End a file job in error with nothing of the file left: its points, if any were
    stored, go (they are named by the document and chunk index)."""
    document_id = job["document_id"]
    _points_forget(user_id=user_id, project_id=project_id, agent_id=job["agent_id"],
                   document_id=document_id, chunks=int(job.get("documents", 0)))  # fmt: skip
    ContextDocument.objects.filter(id=document_id).update(
        status=ContextDocument.Status.ERROR, error=error[:2000], chunks=0, text=""
    )
    job_records.job_finish(
        redis=redis,
        job_id=job["id"],
        fields={"status": "error", "error": error, "finished_at": time.time()},
    )


def _points_forget(
    *,
    user_id: int,
    project_id: uuid.UUID | str,
    agent_id: str,
    document_id: uuid.UUID | str,
    chunks: int,
) -> None:
    """Remove the points a file's document may have stored (`chunks` of them)."""
    if chunks:
        keys = document_point_keys(document_id=document_id, chunks=chunks)
        document_points_forget(user_id=user_id, project_id=project_id, agent_id=agent_id, keys=keys)


def _fetch(url: str) -> tuple[bytes, str]:
    """A file's bytes from its URL, through the egress guard, at most
    CONTEXT_FILE_MAX_BYTES; (bytes, content type)."""
    limit = settings.CONTEXT_FILE_MAX_BYTES
    try:
        with guarded_client(
            purpose=FILES, timeout=settings.CONTEXT_FILE_FETCH_TIMEOUT_SECONDS
        ) as client, client.stream("GET", url) as response:  # fmt: skip
            if response.status_code != 200:
                raise FileRefused(f"fetching the URL answered HTTP {response.status_code}")
            data = bytearray()
            for part in response.iter_bytes():
                data += part
                if len(data) > limit:
                    raise FileRefused(f"the file is larger than {limit} bytes")
            return bytes(data), response.headers.get("content-type", "")
    except EgressRefused as exc:
        raise FileRefused(str(exc)) from exc
    except httpx.HTTPError as exc:
        if isinstance(exc.__cause__, EgressRefused):  # the guard's refusal, as it said it
            raise FileRefused(str(exc.__cause__)) from exc
        raise FileRefused(f"fetching the URL failed: {type(exc).__name__}") from exc


def context_file_ingest(
    *,
    user_id: int,
    project_id: uuid.UUID | str,
    agent_id: str,
    job_id: str,
    document_id: str,
    step: str = "",
) -> bool:
    """Parse a file job's file into chunks (by its structure) and queue them as the
    job's documents; True when the chunks are to be stored (context_job_add's batches
    follow on the bus), False when the job ended here (a bad file: its error says why;
    the same bytes already ingested: nothing added) or `step` is no longer its step owed
    (context_job_add)."""
    redis = scoped(user_id, project_id)
    job = job_records.job_get(redis=redis, job_id=job_id)
    if job is None or job.get("status") in ENDED or not job_records.step_owed(job, step):
        return False  # gone with its workspace, ended, or its step sent again since
    if "documents" in job:
        return True  # parsed by a worker lost before it sent the batches on
    document = ContextDocument.objects.filter(id=document_id, agent_id=agent_id).first()
    if document is None:
        job_records.job_finish(
            redis=redis,
            job_id=job_id,
            fields={"status": "error", "error": "the document was deleted"},
        )
        return False
    job_records.job_update(redis=redis, job_id=job_id, fields={"status": "running"})
    ContextDocument.objects.filter(id=document_id).update(status=ContextDocument.Status.RUNNING)
    started = time.perf_counter()
    try:
        data, kind = _file_read(redis=redis, job_id=job_id, document=document)
        digest = document.content_hash or content_hash(data)
        if _duplicate_ended(redis=redis, job_id=job_id, document=document, digest=digest,
                            user_id=user_id, project_id=project_id):  # fmt: skip
            return False
        sections = parse(
            data,
            kind=kind,
            max_pages=settings.CONTEXT_FILE_MAX_PAGES,
            max_chars=settings.CONTEXT_FILE_MAX_CHARS,
            max_unpacked=settings.CONTEXT_FILE_MAX_UNPACKED_BYTES,
        )
    except FileRefused as exc:
        _file_job_fail(redis=redis, job={**job, "documents": 0}, user_id=user_id,
                       project_id=project_id, error=str(exc))  # fmt: skip
        return False
    chunks = chunk_sections(sections)
    pages = max((s.page or 0 for s in sections), default=0) or None
    ContextDocument.objects.filter(id=document_id).update(
        file_type=kind,
        content_hash=digest,
        size_bytes=len(data),
        pages=pages,
        chunks=len(chunks),
        text="\n\n".join(s.text for s in sections),
    )
    job_records.job_documents_put(
        redis=redis,
        job_id=job_id,
        documents=[_chunk_document(document, c) for c in chunks],
        fields={
            "documents": len(chunks),
            "pages": pages or 0,
            "parse_seconds": round(time.perf_counter() - started, 4),
        },
    )
    return True


def _file_read(*, redis, job_id: str, document: ContextDocument) -> tuple[bytes, str]:
    """A file job's bytes (kept with the job, else fetched from its URL) and its file
    type; FileRefused when they are gone or of a type not taken."""
    data, url = job_records.job_file_get(redis=redis, job_id=job_id)
    content_type = ""
    if data is None:
        if not url:
            raise FileRefused("the file's bytes are gone (the job expired)")
        data, content_type = _fetch(url)
    kind = document.file_type or file_type(
        name=document.source, content_type=content_type, head=data[:8]
    )
    if kind not in settings.CONTEXT_FILE_TYPES:
        raise FileRefused(f"unsupported file type: {kind or 'unknown'}")
    return data, kind


def _duplicate_ended(
    *,
    redis,
    job_id: str,
    document: ContextDocument,
    digest: str,
    user_id: int,
    project_id: uuid.UUID | str,
) -> bool:
    """Whether the agent already has these bytes (a URL fetched to a known file): then
    the new document goes and the job ends done, naming the one it duplicates. A twin
    that failed (job_records.file_ingest_failed) goes instead, with its points if it
    stored any, and this document is ingested."""
    twin = (
        ContextDocument.objects.filter(agent_id=document.agent_id, content_hash=digest)
        .exclude(id=document.id)
        .first()
    )
    if twin is None:
        return False
    if job_records.file_ingest_failed(redis=redis, status=twin.status, job_id=twin.job_id):
        _points_forget(user_id=user_id, project_id=project_id, agent_id=str(twin.agent_id),
                       document_id=twin.id, chunks=twin.chunks)  # fmt: skip
        twin.delete()
        return False
    document.delete()
    job_records.job_finish(
        redis=redis,
        job_id=job_id,
        fields={
            "status": "done",
            "duplicate_of": str(twin.id),
            "chunks": 0,
            "finished_at": time.time(),
        },
    )
    return True


def _chunk_document(document: ContextDocument, chunk) -> dict[str, Any]:
    """One chunk of a file as a job's document: its text, its point's key, and what
    cites it (document, source, page, section)."""
    document_id = str(document.id)
    cite = (
        ("document_id", document_id),
        ("source", document.source),
        ("page", chunk.page),
        ("section", chunk.section),
    )
    return {
        "text": chunk.text,
        "metadata": {"source": document.source},
        "point": document_point_key(document_id=document_id, index=chunk.index),
        "cite": {key: value for key, value in cite if value is not None},
    }


def document_forget(
    *, user_id: int, project_id: uuid.UUID | str, agent_id: str, keys: list[str]
) -> None:
    document_points_forget(user_id=user_id, project_id=project_id, agent_id=agent_id, keys=keys)
