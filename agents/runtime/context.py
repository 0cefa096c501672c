"""An agent's context memory (RAG): chunk, embed and store documents; search them.

Worker side only: everything here opens the embedder and the vector store.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
import uuid
from typing import Any

from .embeddings import get_embedder
from .vectorstore import ContextHit, ContextPoint, collection_name, get_vector_store

logger = logging.getLogger(__name__)

CHUNK_CHARS = 1000
CHUNK_OVERLAP = 120
EMBED_BATCH = 32
# Points of one agent are named by content: storing the same text twice (a redelivered
# job, a repeated document) keeps one point.
POINT_NAMESPACE = uuid.UUID("6f1d7a52-2a0e-4c59-9d7e-3f1b8c0a9e51")


def chunk_text(text: str, *, size: int = CHUNK_CHARS, overlap: int = CHUNK_OVERLAP) -> list[str]:
    """Split text into pieces of at most `size` characters, cut at paragraph, sentence or
    word boundaries where possible, each repeating the tail of the previous one."""
    text = re.sub(r"[ \t]+", " ", text).strip()
    if not text:
        return []
    if len(text) <= size:
        return [text]
    chunks: list[str] = []
    start = 0
    while start < len(text):
        end = min(start + size, len(text))
        if end < len(text):
            window = text[start:end]
            cut = -1
            for sep in ("\n\n", "\n", ". ", "! ", "? ", "; ", " "):
                cut = window.rfind(sep, size // 2)
                if cut != -1:
                    end = start + cut + len(sep)
                    break
        piece = text[start:end].strip()
        if piece:
            chunks.append(piece)
        if end >= len(text):
            break
        # Step back by the overlap, to a word start.
        next_start = max(end - overlap, start + 1)
        space = text.find(" ", next_start, end)
        start = space + 1 if space != -1 else next_start
    return chunks


def point_id(collection: str, text: str) -> str:
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return str(uuid.uuid5(POINT_NAMESPACE, f"{collection}:{digest}"))


def project_deleted(project_id: uuid.UUID | str) -> bool:
    """Whether the project was deleted (its AgentBus tombstone is set)."""
    from workspaces.bus import get_agent_bus

    return get_agent_bus().is_tombstoned(project_id)


def _undo_if_project_deleted(*, project_id: uuid.UUID | str, names: list[str]) -> bool:
    """Drop collections a task wrote to if its project was deleted meanwhile.

    Teardown sets the tombstone before it drops collections, so a write that lands
    after the drop sees the tombstone here and removes what it re-created.
    """
    if not names or not project_deleted(project_id):
        return False
    store = get_vector_store()
    for name in names:
        store.drop_collection(name)
    return True


def collections_ensure(*, user_id: int, project_id: uuid.UUID | str, agent_ids: list[str]) -> int:
    """Create the agents' collections that do not exist yet; returns how many were created.
    Agents deleted since they were registered get none."""
    from agents.models import Agent

    existing = Agent.objects.filter(project_id=project_id, id__in=agent_ids).values_list(
        "id", flat=True
    )
    store, dim = get_vector_store(), get_embedder().dim
    created = 0
    names = [
        collection_name(user_id=user_id, project_id=project_id, agent_id=agent_id)
        for agent_id in existing
    ]
    for name in names:
        created += store.ensure_collection(name, dim=dim)
    if _undo_if_project_deleted(project_id=project_id, names=names):
        return 0
    return created


def collection_drop(*, user_id: int, project_id: uuid.UUID | str, agent_id: str) -> bool:
    name = collection_name(user_id=user_id, project_id=project_id, agent_id=agent_id)
    return get_vector_store().drop_collection(name)


def project_collections_drop(*, user_id: int, project_id: uuid.UUID | str) -> list[str]:
    """Drop every collection of a project (idempotent; raises when the store fails)."""
    return get_vector_store().drop_project(user_id=user_id, project_id=project_id)


def documents_store(
    *,
    user_id: int,
    project_id: uuid.UUID | str,
    agent_id: str,
    documents: list[dict[str, Any]],
    extra_payload: dict[str, Any] | None = None,
) -> int:
    """Chunk, embed and upsert documents ({"text", "metadata"?}); returns the chunk count."""
    name = collection_name(user_id=user_id, project_id=project_id, agent_id=agent_id)
    embedder, store = get_embedder(), get_vector_store()
    store.ensure_collection(name, dim=embedder.dim)
    pending: list[tuple[str, dict[str, Any]]] = []
    for doc_index, doc in enumerate(documents):
        for chunk_index, chunk in enumerate(chunk_text(doc["text"])):
            payload = {
                "text": chunk,
                "document_index": doc_index,
                "chunk_index": chunk_index,
                "metadata": doc.get("metadata") or {},
                "stored_at": time.time(),
                **(extra_payload or {}),
            }
            pending.append((chunk, payload))
    stored = 0
    for i in range(0, len(pending), EMBED_BATCH):
        batch = pending[i : i + EMBED_BATCH]
        vectors = embedder.passages([text for text, _ in batch])
        stored += store.upsert(
            name,
            [
                ContextPoint(id=point_id(name, text), vector=vector, payload=payload)
                for (text, payload), vector in zip(batch, vectors, strict=True)
            ],
        )
    if _undo_if_project_deleted(project_id=project_id, names=[name]):
        return 0
    return stored


EXCHANGE_MAX_CHARS = 4000


def exchange_store(
    *,
    user_id: int,
    project_id: uuid.UUID | str,
    agent_id: str,
    question: str,
    answer: str,
    payload: dict[str, Any],
) -> bool:
    """Remember one question and its answer in the agent's context.

    The point is found by what was asked: its vector is the question's (as a passage),
    its text the whole exchange. Embedding the answer too would cost a worker a
    transformer pass per answer token, before it can take the next message.
    """
    name = collection_name(user_id=user_id, project_id=project_id, agent_id=agent_id)
    embedder, store = get_embedder(), get_vector_store()
    store.ensure_collection(name, dim=embedder.dim)
    text = f"User: {question}\nAssistant: {answer}"
    if len(text) > EXCHANGE_MAX_CHARS:
        text = text[: EXCHANGE_MAX_CHARS - 1] + "…"
    vector = embedder.passages([question[:CHUNK_CHARS]])[0]
    store.upsert(
        name,
        [
            ContextPoint(
                id=point_id(name, text),
                vector=vector,
                payload={
                    **payload,
                    "text": text,
                    "kind": "exchange",
                    "metadata": {},
                    "stored_at": time.time(),
                },
            )
        ],
    )
    return not _undo_if_project_deleted(project_id=project_id, names=[name])


def context_search(
    *, user_id: int, project_id: uuid.UUID | str, agent_id: str, query: str, k: int
) -> list[ContextHit]:
    if k <= 0 or not query.strip():
        return []
    name = collection_name(user_id=user_id, project_id=project_id, agent_id=agent_id)
    store = get_vector_store()
    if not store.exists(name):
        return []
    return store.search(name, get_embedder().query(query), k=k)


def context_clear(*, user_id: int, project_id: uuid.UUID | str, agent_id: str) -> None:
    """Forget everything the agent holds, keeping an (empty) collection."""
    name = collection_name(user_id=user_id, project_id=project_id, agent_id=agent_id)
    store = get_vector_store()
    store.drop_collection(name)
    store.ensure_collection(name, dim=get_embedder().dim)
    _undo_if_project_deleted(project_id=project_id, names=[name])


# --- Jobs run by worker tasks ------------------------------------------------------------


def _agent_exists(*, project_id: uuid.UUID | str, agent_id: str) -> bool:
    from agents.models import Agent

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
    from workspaces.redis import scoped

    from . import streams

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
    from workspaces.redis import scoped

    from . import streams

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
    from workspaces.redis import scoped

    from . import streams

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
    if project_deleted(project_id):
        # Nobody may wait on a deleted project; leave no key behind its teardown.
        redis.delete(streams.reply_key(request_id))
    return "answered"


# --- Repair ------------------------------------------------------------------------------

COLLECTION_RE = re.compile(r"^user_(\d+)_project_([0-9a-f]{32})_([0-9a-f]{32})_context$")


def collections_sweep() -> list[str]:
    """Drop collections whose agent no longer exists; returns their names.

    A collection is only ever created for an agent row that is committed, so one whose
    agent row is missing belongs to a deleted agent or project (a lost drop task, a
    write that raced a deletion). Collections not named by this scheme are left alone.
    """
    from agents.models import Agent

    store = get_vector_store()
    named: dict[str, tuple[int, uuid.UUID, uuid.UUID]] = {}
    for name in store.collections():
        match = COLLECTION_RE.match(name)
        if match:
            named[name] = (int(match[1]), uuid.UUID(match[2]), uuid.UUID(match[3]))
    if not named:
        return []
    existing = set(
        Agent.objects.filter(id__in={agent for *_, agent in named.values()}).values_list(
            "project__owner_id", "project_id", "id"
        )
    )
    dropped = []
    for name, owner_project_agent in named.items():
        if owner_project_agent not in existing and store.drop_collection(name):
            dropped.append(name)
    if dropped:
        logger.warning("dropped %d vector collections of deleted agents", len(dropped))
    return dropped
