"""Agent context in Qdrant: one collection per agent, named after its user, project and agent.

Only worker processes open the store. Local mode (settings.QDRANT_PATH) lets exactly one
process hold a storage folder, which is why web processes never call `get_vector_store`;
with settings.QDRANT_URL any number of workers share a Qdrant server.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from django.conf import settings

COLLECTION_SUFFIX = "_context"


def collection_name(
    *, user_id: int | str, project_id: uuid.UUID | str, agent_id: uuid.UUID | str
) -> str:
    """The seed's `user_{u}_project_{p}_{agent}_context`, with uuids as hex (safe for Qdrant)."""
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


class VectorStore:
    """A thin, typed face of the Qdrant client for agent context."""

    def __init__(self, client: Any, *, local: bool) -> None:
        self._client = client
        self.local = local
        # Local mode keeps collections in plain Python structures: one call at a time.
        self._lock: threading.RLock | None = threading.RLock() if local else None

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        fn = getattr(self._client, method)
        if self._lock is None:
            return fn(*args, **kwargs)
        with self._lock:
            return fn(*args, **kwargs)

    def collections(self) -> list[str]:
        return sorted(c.name for c in self._call("get_collections").collections)

    def exists(self, name: str) -> bool:
        return bool(self._call("collection_exists", name))

    def ensure_collection(self, name: str, *, dim: int) -> bool:
        """Create the collection if missing; True when it was created."""
        from qdrant_client import models

        if self._lock is not None:
            with self._lock:
                return self._ensure_unlocked(name, dim=dim, models=models)
        return self._ensure_unlocked(name, dim=dim, models=models)

    def _ensure_unlocked(self, name: str, *, dim: int, models: Any) -> bool:
        if self._client.collection_exists(name):
            size = self._client.get_collection(name).config.params.vectors.size
            if size != dim:
                raise RuntimeError(
                    f"collection {name} holds {size}-dimensional vectors but the embedder "
                    f"makes {dim}: clear the agent's context after changing the embedder"
                )
            return False
        try:
            self._client.create_collection(
                name, vectors_config=models.VectorParams(size=dim, distance=models.Distance.COSINE)
            )
        except Exception:
            # Another worker (server mode) created it between the check and the create.
            if self._client.collection_exists(name):
                return False
            raise
        return True

    def drop_collection(self, name: str) -> bool:
        """Remove a collection; False when there was none (dropping twice is fine)."""
        if not self.exists(name):
            return False
        self._call("delete_collection", name)
        return True

    def project_collections(self, *, user_id: int, project_id: uuid.UUID | str) -> list[str]:
        prefix = project_collection_prefix(user_id=user_id, project_id=project_id)
        return [n for n in self.collections() if n.startswith(prefix)]

    def drop_project(self, *, user_id: int, project_id: uuid.UUID | str) -> list[str]:
        """Remove every collection of one project; returns the names removed."""
        dropped = []
        for name in self.project_collections(user_id=user_id, project_id=project_id):
            if self.drop_collection(name):
                dropped.append(name)
        return dropped

    def upsert(self, name: str, points: Iterable[ContextPoint]) -> int:
        from qdrant_client import models

        batch = [models.PointStruct(id=p.id, vector=p.vector, payload=p.payload) for p in points]
        if batch:
            self._call("upsert", collection_name=name, points=batch, wait=True)
        return len(batch)

    def search(self, name: str, vector: list[float], *, k: int) -> list[ContextHit]:
        """The k nearest points; an agent with no collection yet has no context."""
        if k <= 0 or not self.exists(name):
            return []
        result = self._call(
            "query_points", collection_name=name, query=vector, limit=k, with_payload=True
        )
        return [
            ContextHit(
                id=str(p.id),
                score=float(p.score),
                text=str((p.payload or {}).get("text", "")),
                payload=dict(p.payload or {}),
            )
            for p in result.points
        ]

    def count(self, name: str) -> int:
        if not self.exists(name):
            return 0
        return int(self._call("count", collection_name=name, exact=True).count)

    def close(self) -> None:
        self._call("close")


_lock = threading.Lock()
_store: VectorStore | None = None
_store_key: tuple | None = None


def _settings_key() -> tuple:
    return (settings.QDRANT_URL, settings.QDRANT_API_KEY, settings.QDRANT_PATH)


def get_vector_store() -> VectorStore:
    """This process's vector store (one client per process). Workers only."""
    global _store, _store_key
    key = _settings_key()
    if _store is None or _store_key != key:
        with _lock:
            if _store is None or _store_key != key:
                if _store is not None:
                    _store.close()
                    _store = None
                from qdrant_client import QdrantClient

                if settings.QDRANT_URL:
                    client = QdrantClient(
                        url=settings.QDRANT_URL, api_key=settings.QDRANT_API_KEY or None
                    )
                    _store = VectorStore(client, local=False)
                else:
                    try:
                        client = QdrantClient(path=settings.QDRANT_PATH)
                    except RuntimeError as exc:
                        raise RuntimeError(
                            f"{exc} Qdrant local mode serves one process: run a single "
                            "worker process (e.g. --concurrency=1 or a threads pool) or set "
                            "QDRANT_URL to a Qdrant server."
                        ) from exc
                    _store = VectorStore(client, local=True)
                _store_key = key
    return _store


def close_vector_store() -> None:
    """Release the store (worker shutdown, tests): local mode frees the folder's lock."""
    global _store, _store_key
    with _lock:
        if _store is not None:
            _store.close()
        _store, _store_key = None, None
