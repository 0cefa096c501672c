"""Agent context in Qdrant: one collection per agent, named after its user, project and agent.

Only worker processes open the store. Local mode (settings.QDRANT_PATH) lets exactly one
process hold a storage folder, which is why web processes never call `get_vector_store`;
with settings.QDRANT_URL any number of workers share a Qdrant server.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from common.singletons import process_singleton

if TYPE_CHECKING:
    from .qdrant_store import VectorStore

COLLECTION_SUFFIX = "_context"


def collection_name(
    *, user_id: int | str, project_id: uuid.UUID | str, agent_id: uuid.UUID | str
) -> str:
    """`user_{u}_project_{p}_{agent}_context`, with uuids as hex (safe for Qdrant)."""
    return (
        f"{project_collection_prefix(user_id=user_id, project_id=project_id)}"
        f"{uuid.UUID(str(agent_id)).hex}{COLLECTION_SUFFIX}"
    )


def project_collection_prefix(*, user_id: int | str, project_id: uuid.UUID | str) -> str:
    """What every collection of one project starts with (and no other project's does)."""
    return f"user_{int(user_id)}_project_{uuid.UUID(str(project_id)).hex}_"


@dataclass(frozen=True)
class ContextPoint:
    id: str
    vector: list[float]
    payload: dict[str, Any]


@dataclass(frozen=True)
class ContextHit:
    id: str
    score: float
    text: str
    payload: dict[str, Any]


@process_singleton(
    settings=("QDRANT_URL", "QDRANT_API_KEY", "QDRANT_PATH"), close=lambda store: store.close()
)
def get_vector_store() -> VectorStore:
    """This process's vector store (one client per process). Workers only."""
    # Here, not at the top: qdrant_client costs ~0.7 s and ~50 MB, and web processes
    # import this module (names, data classes) but never open the store.
    from .qdrant_store import open_store

    return open_store()


def close_vector_store() -> None:
    """Release the store (worker shutdown, tests): local mode frees the folder's lock."""
    get_vector_store.cache_clear()
