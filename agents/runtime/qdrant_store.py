"""The Qdrant client behind `get_vector_store()`: a thin, typed face of it for agent
context. Imported by workers only (qdrant_client is heavy), through vectorstore."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterable
from typing import Any

from django.conf import settings
from qdrant_client import QdrantClient, models

from .vectorstore import ContextHit, ContextPoint, project_collection_prefix


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
        if self._lock is not None:
            with self._lock:
                return self._ensure_unlocked(name, dim=dim)
        return self._ensure_unlocked(name, dim=dim)

    def _ensure_unlocked(self, name: str, *, dim: int) -> bool:
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


def open_store() -> VectorStore:
    """A client for settings.QDRANT_URL, or local mode in settings.QDRANT_PATH."""
    if settings.QDRANT_URL:
        client = QdrantClient(url=settings.QDRANT_URL, api_key=settings.QDRANT_API_KEY or None)
        return VectorStore(client, local=False)
    try:
        client = QdrantClient(path=settings.QDRANT_PATH)
    except RuntimeError as exc:
        raise RuntimeError(
            f"{exc} Qdrant local mode serves one process: run a single worker process "
            "(e.g. --concurrency=1 or a threads pool) or set QDRANT_URL to a Qdrant server."
        ) from exc
    return VectorStore(client, local=True)
