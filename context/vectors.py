"""An agent's context memory (RAG): store, search, clear and drop vectors, on workers.

Everything here opens the embedder and the vector store, and reaches points only through
the agent's or the project's `TenantScope`. In the shared layout the embedding model's
collection is created on the first write; an agent that never stored anything has no
points, and searching it finds nothing.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from django.conf import settings

from agentbus import project_gone
from agents.models import Agent
from common.budget import Budget

from .chunking import CHUNK_CHARS, chunk_text, point_id
from .embeddings import get_embedder
from .vectorstore import (
    ContextHit,
    ContextPoint,
    TenantScope,
    get_vector_store,
    shared_collection_name,
)

logger = logging.getLogger(__name__)

# Chunks embedded at a time: a few hundred milliseconds with the bundled model, and
# between two of them a write asks whether to stop.
EMBED_BATCH = 8
EXCHANGE_MAX_CHARS = 4000


def _agent(user_id: int, project_id: uuid.UUID | str, agent_id: uuid.UUID | str) -> TenantScope:
    return TenantScope.agent(user_id=user_id, project_id=project_id, agent_id=agent_id)


def _undo_if_project_gone(*, scope: TenantScope) -> bool:
    """Remove what a task wrote if its project was deleted meanwhile.

    Teardown sets the tombstone before it deletes the project's points, so a write that
    lands after that delete sees the tombstone here and removes what it added.
    """
    if not project_gone(scope.project_id):
        return False
    get_vector_store().delete(scope)
    return True


def collection_drop(*, user_id: int, project_id: uuid.UUID | str, agent_id: str) -> bool:
    """Remove a deleted agent's context (idempotent): True if there was some."""
    return bool(get_vector_store().delete(_agent(user_id, project_id, agent_id)))


def project_collections_drop(*, user_id: int, project_id: uuid.UUID | str) -> list[str]:
    """Remove every point of a project, in every collection of both layouts, and check
    that none is left (idempotent; raises when the store fails or points remain)."""
    scope = TenantScope.project(user_id=user_id, project_id=project_id)
    return get_vector_store().delete_verified(scope)


def documents_store(
    *,
    user_id: int,
    project_id: uuid.UUID | str,
    agent_id: str,
    documents: list[dict[str, Any]],
    first_index: int = 0,
    extra_payload: dict[str, Any] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> int | None:
    """Chunk, embed and upsert documents ({"text", "metadata"?}); returns the chunk count,
    or None if `should_stop` said to stop (between two embedding batches)."""
    scope = _agent(user_id, project_id, agent_id)
    embedder, store = get_embedder(), get_vector_store()
    pending: list[tuple[str, dict[str, Any], str]] = []
    for doc_index, doc in enumerate(documents, start=first_index):
        for chunk_index, chunk in enumerate(chunk_text(doc["text"])):
            payload = {
                "text": chunk,
                "document_index": doc_index,
                "chunk_index": chunk_index,
                "metadata": doc.get("metadata") or {},
                "stored_at": time.time(),
                **(extra_payload or {}),
                # A file's chunk: its document, source, page and section (citations).
                **(doc.get("cite") or {}),
            }
            # A file's chunk is named by its document and place, other text by itself.
            key = f"{doc['point']}:{chunk_index}" if doc.get("point") else chunk
            pending.append((chunk, payload, key))
    stored = 0
    for i in range(0, len(pending), EMBED_BATCH):
        if should_stop is not None and should_stop():
            _undo_if_project_gone(scope=scope)
            return None
        batch = pending[i : i + EMBED_BATCH]
        vectors = embedder.passages([text for text, _, _ in batch])
        stored += store.upsert(
            scope,
            [
                ContextPoint(id=point_id(scope.collection, key), vector=vector, payload=payload)
                for (_, payload, key), vector in zip(batch, vectors, strict=True)
            ],
            model=embedder.name,
            dim=embedder.dim,
        )
    if _undo_if_project_gone(scope=scope):
        return 0
    return stored


def exchange_store(
    *,
    user_id: int,
    project_id: uuid.UUID | str,
    agent_id: str,
    question: str,
    answer: str,
    payload: dict[str, Any],
    question_vector: list[float] | None = None,
) -> bool:
    """Remember one question and its answer in the agent's context.

    The point is found by what was asked: its vector is the question's, its text the
    whole exchange. Embedding the answer too would cost a worker a transformer pass per
    answer token, before it can take the next message. `question_vector` is the
    question as the run already embedded it to search (a query: finding a past exchange
    by a similar question is a symmetric match, which e5-style models embed as a query
    on both sides), so a chat message is embedded once; without it the question is
    embedded as a passage.
    """
    scope = _agent(user_id, project_id, agent_id)
    embedder, store = get_embedder(), get_vector_store()
    text = _exchange_text(question, answer)
    if question_vector is not None:
        embedded, embedded_as, vector = question, "query", question_vector
    else:
        embedded, embedded_as = question[:CHUNK_CHARS], "passage"
        vector = embedder.passages([embedded])[0]
    store.upsert(
        scope,
        [
            ContextPoint(
                id=point_id(scope.collection, text),
                vector=vector,
                payload={
                    **payload,
                    "text": text,
                    # What the vector embeds, where it is not the text: re-embedding
                    # under a new model must embed the same thing.
                    "embedded_text": embedded,
                    "embedded_as": embedded_as,
                    "kind": "exchange",
                    "metadata": {},
                    "stored_at": time.time(),
                },
            )
        ],
        model=embedder.name,
        dim=embedder.dim,
    )
    return not _undo_if_project_gone(scope=scope)


def _exchange_text(question: str, answer: str) -> str:
    text = f"User: {question}\nAssistant: {answer}"
    return text if len(text) <= EXCHANGE_MAX_CHARS else text[: EXCHANGE_MAX_CHARS - 1] + "…"


def exchanges_forget(
    *, user_id: int, project_id: uuid.UUID | str, agent_id: str, question: str, answers: list[str]
) -> None:
    """Forget the remembered exchanges of `question` with these `answers` (ones that
    regenerate replaced): a point's id follows from its text, so no search is needed."""
    if not answers:
        return
    scope = _agent(user_id, project_id, agent_id)
    embedder = get_embedder()
    ids = [point_id(scope.collection, _exchange_text(question, answer)) for answer in answers]
    get_vector_store().forget(scope, ids, model=embedder.name, dim=embedder.dim)


def _store_and_collection(scope: TenantScope) -> tuple[Any, str]:
    """The vector store and the collection that holds the agent's points in its layout."""
    embedder, store = get_embedder(), get_vector_store()
    if store.layout == "shared":
        return store, shared_collection_name(model=embedder.name, dim=embedder.dim)
    return store, scope.collection


def exchanges_before(
    *, user_id: int, project_id: uuid.UUID | str, agent_id: str, before: float, page: int = 256
) -> Iterator[tuple[str, str | None]]:
    """(point id, session id) of the exchanges the agent remembers that were stored before
    `before` (epoch seconds), in the store's order: what session-context retention looks
    at. Workers only."""
    scope = _agent(user_id, project_id, agent_id)
    store, collection = _store_and_collection(scope)
    offset = None
    while True:
        points, offset = store.scroll(scope, collection=collection, offset=offset, limit=page)
        for point in points:
            payload = point.payload or {}
            if payload.get("kind") == "exchange" and (payload.get("stored_at") or 0) < before:
                yield str(point.id), payload.get("session_id")
        if offset is None:
            return


def exchange_points_forget(
    *, user_id: int, project_id: uuid.UUID | str, agent_id: str, ids: list[str]
) -> None:
    """Remove remembered exchanges by point id (ids from `exchanges_before`)."""
    scope = _agent(user_id, project_id, agent_id)
    embedder = get_embedder()
    get_vector_store().forget(scope, ids, model=embedder.name, dim=embedder.dim)


def document_points_forget(
    *, user_id: int, project_id: uuid.UUID | str, agent_id: str, keys: list[str]
) -> None:
    """Remove a document's points (keys: chunking.document_point_key, each chunk's)."""
    scope = _agent(user_id, project_id, agent_id)
    embedder = get_embedder()
    ids = [point_id(scope.collection, f"{key}:0") for key in keys]
    get_vector_store().forget(scope, ids, model=embedder.name, dim=embedder.dim)


def query_embed(query: str, *, project_id: uuid.UUID | str) -> list[float]:
    """A search text's vector, to search with and to remember the question by."""
    return get_embedder().query(query, tenant=str(project_id))


def context_search(
    *,
    user_id: int,
    project_id: uuid.UUID | str,
    agent_id: str,
    query: str,
    k: int,
    vector: list[float] | None = None,
    mode: str = "dense",
) -> list[ContextHit]:
    """The agent's k best points for `query` (`vector`: its `query_embed`, when the
    caller already has it), by `mode`: dense, sparse (BM25-like terms) or hybrid (both,
    fused by reciprocal rank)."""
    if k <= 0 or not query.strip():
        return []
    scope = _agent(user_id, project_id, agent_id)
    embedder = get_embedder()
    if vector is None and mode != "sparse":
        vector = embedder.query(query, tenant=str(project_id))
    return get_vector_store().search(
        scope,
        vector,
        k=k,
        model=embedder.name,
        dim=embedder.dim,
        query=query,
        mode=mode,
        prefetch=settings.CONTEXT_HYBRID_PREFETCH,
    )


def citation(hit: ContextHit) -> dict[str, Any]:
    """Where a hit comes from, for an answer to cite: its point, and for a file's chunk
    the document, its source name, page and section."""
    payload = hit.payload
    return {
        key: payload[key]
        for key in ("document_id", "source", "page", "section")
        if payload.get(key) is not None
    }


def context_clear(*, user_id: int, project_id: uuid.UUID | str, agent_id: str) -> None:
    """Forget everything the agent holds."""
    get_vector_store().delete(_agent(user_id, project_id, agent_id))


# --- Repair ------------------------------------------------------------------------------


def collections_sweep(*, budget_seconds: float | None = None) -> list[str]:
    """Remove the context of agents that no longer exist; returns their logical
    collection names.

    Context is only ever stored for an agent row that is committed, so context whose
    agent row is missing belongs to a deleted agent or project (a lost drop task, a
    write that raced a deletion). Collections not named by either scheme are left alone.
    Then shared collections are optimised (deleted points vacuumed). Within
    CONTEXT_SWEEP_BUDGET_SECONDS (common.budget): past it, it stops between two
    agents' context, leaves the optimising too, and the next sweep goes on.
    """
    budget = Budget(
        settings.CONTEXT_SWEEP_BUDGET_SECONDS if budget_seconds is None else budget_seconds
    )
    store = get_vector_store()
    held: set[TenantScope] = set()
    for scopes in store.contexts().values():
        held |= scopes
    if held:
        existing = {
            (owner, project, agent)
            for owner, project, agent in Agent.objects.filter(
                id__in={s.agent_id for s in held}
            ).values_list("project__owner_id", "project_id", "id")
        }
        gone = sorted(
            (s for s in held if (s.user_id, s.project_id, s.agent_id) not in existing),
            key=lambda s: s.collection,
        )
    else:
        gone = []
    dropped = []
    for scope in gone:
        if store.delete(scope):
            dropped.append(scope.collection)
        if budget.over():
            break
    if dropped:
        logger.warning("removed the vector context of %d deleted agents", len(dropped))
    if budget.over():
        logger.info("context sweep: out of time; the next sweep goes on")
    else:
        store.optimize()
    return dropped


def context_vacuum() -> None:
    """Remove deleted points for good: the embedded store keeps their bytes on disk (in
    segments until vacuumed, in its write-ahead log) after a delete. Workers only."""
    get_vector_store().purge_deleted()


def context_documents(
    *, user_id: int, project_id: uuid.UUID | str, agent_id: str, page: int = 256
) -> list[dict[str, Any]]:
    """What the agent's context holds, one document per stored chunk ({"text", the
    "metadata" it was given}), in the order it was stored: what an export carries and an
    import embeds again with the deployment's model. Workers only."""
    scope = _agent(user_id, project_id, agent_id)
    store, collection = _store_and_collection(scope)
    documents, offset = [], None
    while True:
        points, offset = store.scroll(scope, collection=collection, offset=offset, limit=page)
        for point in points:
            payload = point.payload
            order = (payload.get("stored_at") or 0, payload.get("document_index") or 0,
                     payload.get("chunk_index") or 0)  # fmt: skip
            documents.append((order, {"text": payload.get("text", ""),
                                      "metadata": payload.get("metadata") or {}}))  # fmt: skip
        if offset is None:
            break
    return [document for _, document in sorted(documents, key=lambda d: (d[0], d[1]["text"]))]
