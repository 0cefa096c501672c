"""An agent's context memory (RAG): store, search, clear and drop vectors, on workers.

Everything here opens the embedder and the vector store. Collections are created on the
first write: an agent that never stored anything has none, and searching it finds
nothing.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

from agentbus import project_gone

from ..models import Agent
from .chunking import CHUNK_CHARS, chunk_text, point_id
from .embeddings import get_embedder
from .vectorstore import ContextHit, ContextPoint, collection_name, get_vector_store

logger = logging.getLogger(__name__)

# Chunks embedded at a time: a few hundred milliseconds with the bundled model, and
# between two of them a write asks whether to stop.
EMBED_BATCH = 8
EXCHANGE_MAX_CHARS = 4000


def _undo_if_project_gone(*, project_id: uuid.UUID | str, names: list[str]) -> bool:
    """Drop collections a task wrote to if its project was deleted meanwhile.

    Teardown sets the tombstone before it drops collections, so a write that lands
    after the drop sees the tombstone here and removes what it re-created.
    """
    if not names or not project_gone(project_id):
        return False
    store = get_vector_store()
    for name in names:
        store.drop_collection(name)
    return True


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
    first_index: int = 0,
    extra_payload: dict[str, Any] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> int | None:
    """Chunk, embed and upsert documents ({"text", "metadata"?}); returns the chunk count,
    or None if `should_stop` said to stop (between two embedding batches)."""
    name = collection_name(user_id=user_id, project_id=project_id, agent_id=agent_id)
    embedder, store = get_embedder(), get_vector_store()
    store.ensure_collection(name, dim=embedder.dim)
    pending: list[tuple[str, dict[str, Any]]] = []
    for doc_index, doc in enumerate(documents, start=first_index):
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
        if should_stop is not None and should_stop():
            _undo_if_project_gone(project_id=project_id, names=[name])
            return None
        batch = pending[i : i + EMBED_BATCH]
        vectors = embedder.passages([text for text, _ in batch])
        stored += store.upsert(
            name,
            [
                ContextPoint(id=point_id(name, text), vector=vector, payload=payload)
                for (text, payload), vector in zip(batch, vectors, strict=True)
            ],
        )
    if _undo_if_project_gone(project_id=project_id, names=[name]):
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
    return not _undo_if_project_gone(project_id=project_id, names=[name])


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
    """Forget everything the agent holds."""
    name = collection_name(user_id=user_id, project_id=project_id, agent_id=agent_id)
    get_vector_store().drop_collection(name)


# --- Repair ------------------------------------------------------------------------------

COLLECTION_RE = re.compile(r"^user_(\d+)_project_([0-9a-f]{32})_([0-9a-f]{32})_context$")


def collections_sweep() -> list[str]:
    """Drop collections whose agent no longer exists; returns their names.

    A collection is only ever created for an agent row that is committed, so one whose
    agent row is missing belongs to a deleted agent or project (a lost drop task, a
    write that raced a deletion). Collections not named by this scheme are left alone.
    """
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
