"""The vector store behind `get_vector_store()`: agent context in Qdrant, in either
layout, with every point operation confined to one tenant. Imported by workers only
(the Qdrant libraries are heavy), through vectorstore.

Engines, by deployment:

- settings.QDRANT_URL: a Qdrant server (qdrant-client) holds both layouts' collections.
- embedded (settings.QDRANT_PATH): the shared collections are Qdrant Edge shards under
  `{QDRANT_PATH}/edge/` (Qdrant's engine in-process: payload indexes, the is_tenant
  index, on-disk segments), and per-agent collections are qdrant-client's local mode in
  `{QDRANT_PATH}`. Local mode has no payload index at all (every filter is evaluated
  point by point in Python, and the whole folder is unpickled into memory when it
  opens), so a collection shared by thousands of agents cannot live there; Edge, in
  turn, is one shard per collection, which suits a handful of shared collections and
  not thousands of per-agent ones. Each engine opens on first use.

Isolation is structural: `VectorStore` has no method that touches points without a
`TenantScope`, and the engines take a `_Where`, which only a scope can make.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from django.conf import settings

from .scopes import (
    COLLECTION_RE,
    SHARED_PREFIX,
    SHARED_RE,
    TENANT_FIELD,
    ContextHit,
    ContextPoint,
    TenantScope,
    TenantScopeRequired,
    require_scope,
    shared_collection_name,
)
from .sparse import SEARCH_MODES, SPARSE_VECTOR, Sparse, passage_sparse, query_sparse

# Reciprocal-rank fusion's constant (Qdrant's own default: a hit's fused score is
# the sum of 1 / (RRF_K + rank) over the lists that hold it).
RRF_K = 60
# A collection being rebuilt with sparse vectors is copied aside under this suffix.
REBUILD_SUFFIX = "__sparse"
# Every distinct agent of a shared collection, listed in one facet request.
FACET_LIMIT = 10_000_000
EDGE_DIR = "edge"
logger = logging.getLogger(__name__)
# A collection made before sparse vectors is looked at again after this long (the
# re-index command may have given it one meanwhile).
SPARSE_RECHECK_SECONDS = 60.0
UNAVAILABLE_HINT = (
    " The embedded store opens in one process at a time: other worker processes send "
    "their calls to the one that owns it (get_vector_store), or set QDRANT_URL to a "
    "Qdrant server."
)


@dataclass(frozen=True)
class _Where:
    """Where a tenant's points are: a collection and the payload every one of them has.

    Made only from a TenantScope (`shared`, `own_collection`): an engine refuses any
    other argument, so no engine call reaches points without naming a tenant.
    """

    collection: str
    must: tuple[tuple[str, Any], ...]
    scope: TenantScope

    @classmethod
    def shared(cls, scope: TenantScope, collection: str) -> _Where:
        scope = require_scope(scope)
        return cls(collection, tuple(sorted(scope.conditions().items())), scope)

    @classmethod
    def own_collection(cls, scope: TenantScope) -> _Where:
        """An agent's own collection (per_agent): the collection is the tenant boundary.
        Its points are not filtered by payload, since points stored before the tenant
        fields existed have none."""
        scope = require_scope(scope, agent=True)
        return cls(scope.collection, (), scope)


def _where(where: Any) -> _Where:
    if not isinstance(where, _Where):
        raise TenantScopeRequired("engines touch points only through a tenant's _Where")
    if where.must and dict(where.must).get(TENANT_FIELD) is None:
        raise TenantScopeRequired("a payload filter without the tenant field")
    return where


def _with_ids(ids: Iterable[str]) -> list[str]:
    return [str(i) for i in ids]


# --- engines -------------------------------------------------------------------------


class _ClientEngine:
    """Collections of qdrant-client: a server, or local mode in a folder."""

    def __init__(self, client: Any, *, local: bool) -> None:
        # Here, not at the top: qdrant_client (~0.7 s, ~50 MB) loads only for the engines
        # that use it; the embedded shared layout (Qdrant Edge) never does.
        from qdrant_client import models

        self._client = client
        self._models = models
        self.local = local
        # Local mode keeps collections in plain Python structures: one call at a time.
        self._lock: threading.RLock | contextlib.nullcontext = (
            threading.RLock() if local else contextlib.nullcontext()
        )

    def _filter(self, where: _Where, ids: list[str] | None = None) -> Any:
        m = self._models
        must: list[Any] = [
            m.FieldCondition(key=key, match=m.MatchValue(value=value)) for key, value in where.must
        ]
        if ids is not None:
            must.append(m.HasIdCondition(has_id=ids))
        return m.Filter(must=must) if must else None

    def collections(self) -> list[str]:
        with self._lock:
            return sorted(c.name for c in self._client.get_collections().collections)

    def exists(self, name: str) -> bool:
        with self._lock:
            return bool(self._client.collection_exists(name))

    def create(self, name: str, *, dim: int, shared: bool) -> bool:
        """Create the collection if missing; True when it was created."""
        m = self._models
        with self._lock:
            if self._client.collection_exists(name):
                size = self._client.get_collection(name).config.params.vectors.size
                if size != dim:
                    raise RuntimeError(
                        f"collection {name} holds {size}-dimensional vectors but the "
                        f"embedder makes {dim}: clear the agent's context after changing "
                        "the embedder, or use VECTOR_LAYOUT=shared (a collection per model)"
                    )
                return False
            try:
                self._client.create_collection(
                    name,
                    vectors_config=m.VectorParams(size=dim, distance=m.Distance.COSINE),
                    # The text's BM25-like terms; Qdrant weighs them by their IDF.
                    sparse_vectors_config={
                        SPARSE_VECTOR: m.SparseVectorParams(modifier=m.Modifier.IDF)
                    },
                    # Shared: no global graph, one per tenant (Qdrant's multitenancy setup).
                    hnsw_config=m.HnswConfigDiff(m=0, payload_m=16) if shared else None,
                )
            except Exception:
                # Another worker (server mode) created it between the check and the create.
                if self._client.collection_exists(name):
                    return False
                raise
            if shared and not self.local:  # local mode has no payload index to build
                for field, schema in _index_schemas(m):
                    self._client.create_payload_index(name, field, field_schema=schema, wait=True)
            return True

    def dim(self, name: str) -> int:
        with self._lock:
            return int(self._client.get_collection(name).config.params.vectors.size)

    def has_sparse(self, name: str) -> bool:
        with self._lock:
            sparse = self._client.get_collection(name).config.params.sparse_vectors or {}
        return SPARSE_VECTOR in sparse

    def add_sparse(self, name: str) -> bool:
        """Neither a server nor local mode adds a vector to an existing collection: the
        caller rebuilds it (VectorStore.sparse_reindex)."""
        return False

    def set_sparse(self, where: _Where, vectors: list[tuple[str, Sparse]]) -> None:
        _where(where)
        m = self._models
        batch = [m.PointVectors(id=i, vector={SPARSE_VECTOR: self._sparse(v)}) for i, v in vectors]
        with self._lock:
            self._client.update_vectors(collection_name=where.collection, points=batch, wait=True)

    def _sparse(self, sparse: Sparse) -> Any:
        return self._models.SparseVector(indices=sparse.indices, values=sparse.values)

    def _vectors(self, point: ContextPoint, sparse: Sparse | None) -> Any:
        if sparse is None:
            return point.vector
        return {"": point.vector, SPARSE_VECTOR: self._sparse(sparse)}

    def drop(self, name: str) -> bool:
        with self._lock:
            if not self._client.collection_exists(name):
                return False
            self._client.delete_collection(name)
            return True

    def upsert(
        self, where: _Where, points: list[ContextPoint], sparse: list[Sparse] | None = None
    ) -> None:
        _where(where)
        m = self._models
        vectors = sparse or [None] * len(points)
        batch = [
            m.PointStruct(id=p.id, vector=self._vectors(p, v), payload=p.payload)
            for p, v in zip(points, vectors, strict=True)
        ]
        with self._lock:
            self._client.upsert(collection_name=where.collection, points=batch, wait=True)

    def query(
        self,
        where: _Where,
        vector: list[float],
        *,
        k: int,
        sparse: Sparse | None = None,
        mode: str = "dense",
        prefetch: int = 0,
    ) -> list[ContextHit]:
        _where(where)
        m = self._models
        flt = self._filter(where)
        if mode == "sparse":
            kwargs: dict[str, Any] = {"query": self._sparse(sparse), "using": SPARSE_VECTOR}
        elif mode == "hybrid":
            kwargs = {
                "prefetch": [
                    m.Prefetch(query=vector, filter=flt, limit=prefetch),
                    m.Prefetch(
                        query=self._sparse(sparse), using=SPARSE_VECTOR, filter=flt, limit=prefetch
                    ),
                ],
                "query": m.FusionQuery(fusion=m.Fusion.RRF),
            }
        else:
            kwargs = {"query": vector}
        with self._lock:
            result = self._client.query_points(
                collection_name=where.collection,
                limit=k,
                query_filter=flt,
                with_payload=True,
                **kwargs,
            )
        return [_hit(p.id, p.score, p.payload) for p in result.points]

    def count(self, where: _Where) -> int:
        _where(where)
        with self._lock:
            return int(
                self._client.count(
                    collection_name=where.collection, count_filter=self._filter(where), exact=True
                ).count
            )

    def delete(self, where: _Where, ids: list[str] | None = None) -> None:
        _where(where)
        m = self._models
        flt = self._filter(where, ids)
        if flt is None:  # a whole own collection: that is a drop, not a delete
            raise TenantScopeRequired("drop an agent's own collection instead")
        with self._lock:
            self._client.delete(
                collection_name=where.collection,
                points_selector=m.FilterSelector(filter=flt),
                wait=True,
            )

    def scroll(
        self, where: _Where, *, offset: Any, limit: int, ids: list[str] | None = None
    ) -> tuple[list[ContextPoint], Any]:
        _where(where)
        with self._lock:
            records, following = self._client.scroll(
                collection_name=where.collection,
                scroll_filter=self._filter(where, ids),
                limit=limit,
                offset=offset,
                with_payload=True,
                with_vectors=True,
            )
        return [_point(r.id, r.vector, r.payload) for r in records], following

    def values(self, name: str, key: str) -> list[Any]:
        """Every distinct value of a payload field in a collection (tenant names, not
        points: what the sweep and the migration walk)."""
        with self._lock:
            hits = self._client.facet(name, key, limit=FACET_LIMIT, exact=True).hits
        return [h.value for h in hits]

    def optimize(self, name: str) -> None:
        """The server optimises on its own."""

    def close(self) -> None:
        with self._lock:
            self._client.close()


def _index_schemas(m: Any) -> list[tuple[str, Any]]:
    return [
        (TENANT_FIELD, m.KeywordIndexParams(type="keyword", is_tenant=True)),
        ("agent_id", m.KeywordIndexParams(type="keyword")),
        ("collection", m.KeywordIndexParams(type="keyword")),
        ("user_id", m.IntegerIndexParams(type="integer", lookup=True, range=False)),
    ]


# Edge optimiser settings that vacuum a segment with any deleted point (the defaults wait
# for 20% deleted and 1,000 points).
VACUUM_ALL = {"deleted_threshold": 0.0, "vacuum_min_vector_number": 1}


class _EdgeEngine:
    """Shared collections as Qdrant Edge shards, one directory each under `root`."""

    def __init__(self, root: Path) -> None:
        # Here, not at the top: only the embedded shared layout opens Qdrant Edge.
        import qdrant_edge

        self._e = qdrant_edge
        self.root = root
        self.local = True
        self._lock = threading.RLock()
        self._shards: dict[str, Any] = {}
        self._sparse_known: dict[str, bool] = {}
        root.mkdir(parents=True, exist_ok=True)
        for path in sorted(root.iterdir()):
            if path.is_dir() and SHARED_RE.match(path.name):
                self._shards[path.name] = self._open(path)

    def _open(self, path: Path) -> Any:
        try:
            return self._e.EdgeShard.load(str(path))
        except Exception as exc:
            if "WouldBlock" in str(exc):
                for shard in self._shards.values():
                    shard.close()
                raise RuntimeError(
                    f"Storage folder {self.root} is already accessed by another instance."
                    + UNAVAILABLE_HINT
                ) from exc
            raise

    def _shard(self, name: str) -> Any:
        shard = self._shards.get(name)
        if shard is None:
            raise LookupError(f"no collection {name}")
        return shard

    def _filter(self, where: _Where, ids: list[str] | None = None) -> Any:
        e = self._e
        must: list[Any] = [
            e.FieldCondition(key, match=e.MatchValue(value)) for key, value in where.must
        ]
        if ids is not None:
            must.append(e.HasIdCondition({uuid.UUID(i) for i in ids}))
        return e.Filter(must=must)

    def collections(self) -> list[str]:
        with self._lock:
            return sorted(self._shards)

    def exists(self, name: str) -> bool:
        with self._lock:
            return name in self._shards

    def create(self, name: str, *, dim: int, shared: bool) -> bool:
        e = self._e
        if not SHARED_RE.match(name):
            raise ValueError(f"{name} is not a shared collection's name")
        with self._lock:
            if name in self._shards:
                return False
            path = self.root / name
            if path.exists():  # a create that died half-way: nothing was stored yet
                shutil.rmtree(path)
            config = e.EdgeConfig(
                vectors=e.EdgeVectorParams(size=dim, distance=e.Distance.Cosine, on_disk=True),
                sparse_vectors={SPARSE_VECTOR: e.EdgeSparseVectorParams(modifier=e.Modifier.Idf)},
                # No global graph, one per tenant (Qdrant's multitenancy setup); a tenant
                # under the full-scan threshold is searched exactly through its index.
                hnsw_config=e.HnswIndexConfig(
                    m=0, ef_construct=100, full_scan_threshold=10_000, payload_m=16
                ),
            )
            shard = e.EdgeShard.create(str(path), config)
            schemas = {
                TENANT_FIELD: e.KeywordIndexParams(is_tenant=True),
                "agent_id": e.KeywordIndexParams(),
                "collection": e.KeywordIndexParams(),
                "user_id": e.IntegerIndexParams(lookup=True, range=False),
            }
            for field, schema in schemas.items():
                shard.update(e.UpdateOperation.create_field_index(field, schema))
            shard.flush()
            self._shards[name] = shard
            self._sparse_known[name] = True
            return True

    def has_sparse(self, name: str) -> bool:
        """Whether the shard has the sparse vector (Edge reports no vector config: a
        query on it answers)."""
        e = self._e
        with self._lock:
            known = self._sparse_known.get(name)
            if known is None:
                probe = e.QueryRequest(
                    limit=1, query=e.Query.Nearest(e.SparseVector([0], [1.0]), SPARSE_VECTOR)
                )
                try:
                    self._shard(name).query(probe)
                    known = True
                except Exception:
                    known = False
                self._sparse_known[name] = known
            return known

    def add_sparse(self, name: str) -> bool:
        """Add the sparse vector to a shard made before it existed (in place)."""
        e = self._e
        with self._lock:
            if not self.has_sparse(name):
                self._shard(name).update(
                    e.UpdateOperation.create_sparse_vector(SPARSE_VECTOR, e.Modifier.Idf)
                )
                self._sparse_known[name] = True
        return True

    def set_sparse(self, where: _Where, vectors: list[tuple[str, Sparse]]) -> None:
        _where(where)
        e = self._e
        batch = [
            e.PointVectors(uuid.UUID(i), {SPARSE_VECTOR: e.SparseVector(v.indices, v.values)})
            for i, v in vectors
        ]
        with self._lock:
            self._shard(where.collection).update(e.UpdateOperation.update_vectors(batch))

    def drop(self, name: str) -> bool:
        with self._lock:
            shard = self._shards.pop(name, None)
            if shard is None:
                return False
            shard.close()
            self._sparse_known.pop(name, None)
            shutil.rmtree(self.root / name, ignore_errors=True)
            return True

    def upsert(
        self, where: _Where, points: list[ContextPoint], sparse: list[Sparse] | None = None
    ) -> None:
        _where(where)
        e = self._e
        vectors = sparse or [None] * len(points)
        batch = [
            e.Point(
                uuid.UUID(p.id),
                p.vector
                if v is None
                else {"": p.vector, SPARSE_VECTOR: e.SparseVector(v.indices, v.values)},
                p.payload,
            )
            for p, v in zip(points, vectors, strict=True)
        ]
        with self._lock:
            self._shard(where.collection).update(e.UpdateOperation.upsert_points(batch))

    def query(
        self,
        where: _Where,
        vector: list[float],
        *,
        k: int,
        sparse: Sparse | None = None,
        mode: str = "dense",
        prefetch: int = 0,
    ) -> list[ContextHit]:
        _where(where)
        e = self._e
        flt = self._filter(where)
        if mode == "sparse":
            request = e.QueryRequest(
                limit=k,
                query=e.Query.Nearest(e.SparseVector(sparse.indices, sparse.values), SPARSE_VECTOR),
                filter=flt,
                with_payload=True,
            )
        elif mode == "hybrid":
            request = e.QueryRequest(
                limit=k,
                prefetches=[
                    e.Prefetch(query=e.Query.Nearest(vector), limit=prefetch, filter=flt),
                    e.Prefetch(
                        query=e.Query.Nearest(
                            e.SparseVector(sparse.indices, sparse.values), SPARSE_VECTOR
                        ),
                        limit=prefetch,
                        filter=flt,
                    ),
                ],
                query=e.Fusion.Rrf(k=RRF_K),
                filter=flt,
                with_payload=True,
            )
        else:
            request = e.QueryRequest(
                limit=k, query=e.Query.Nearest(vector), filter=flt, with_payload=True
            )
        with self._lock:
            found = self._shard(where.collection).query(request)
        return [_hit(p.id, p.score, p.payload) for p in found]

    def count(self, where: _Where) -> int:
        _where(where)
        request = self._e.CountRequest(exact=True, filter=self._filter(where))
        with self._lock:
            return int(self._shard(where.collection).count(request))

    def delete(self, where: _Where, ids: list[str] | None = None) -> None:
        _where(where)
        operation = self._e.UpdateOperation.delete_points_by_filter(self._filter(where, ids))
        with self._lock:
            # Like every update, recorded in the shard's write-ahead log before it
            # applies: no flush of the segments here (that would write out every update
            # since the last flush, and make a teardown wait on it).
            self._shard(where.collection).update(operation)

    def scroll(
        self, where: _Where, *, offset: Any, limit: int, ids: list[str] | None = None
    ) -> tuple[list[ContextPoint], Any]:
        _where(where)
        request = self._e.ScrollRequest(
            offset=offset,
            limit=limit,
            filter=self._filter(where, ids),
            with_payload=True,
            with_vector=True,
        )
        with self._lock:
            records, following = self._shard(where.collection).scroll(request)
        return [_point(r.id, r.vector, r.payload) for r in records], following

    def values(self, name: str, key: str) -> list[Any]:
        request = self._e.FacetRequest(key=key, limit=FACET_LIMIT, exact=True)
        with self._lock:
            return [h.value for h in self._shard(name).facet(request).hits]

    def optimize(self, name: str) -> None:
        """Vacuum deleted points and build tenants' graphs (Edge has no background
        optimiser: the collections sweep calls this)."""
        with self._lock:
            self._shard(name).optimize()

    def purge_deleted(self) -> None:
        """Erase the bytes of deleted points (a user's erasure): every segment holding a
        deleted point is vacuumed, and the write-ahead log, which still holds what was
        written, goes once everything is flushed into the segments (a shard loads
        without it). Each shard is closed meanwhile, under the lock."""
        with self._lock:
            for name in list(self._shards):
                path = self.root / name
                shard = self._shards.pop(name)
                shard.flush()
                shard.close()
                config_path = path / "edge_config.json"
                config = json.loads(config_path.read_text())
                # Vacuum any segment with a deleted point, however few (kept for the
                # collections sweep's optimise too: deleted context is gone from disk).
                config["optimizers"] = {**(config.get("optimizers") or {}), **VACUUM_ALL}
                config_path.write_text(json.dumps(config))
                shard = self._open(path)
                shard.optimize()
                shard.flush()
                shard.close()
                shutil.rmtree(path / "wal", ignore_errors=True)
                self._shards[name] = self._open(path)

    def close(self) -> None:
        with self._lock:
            for shard in self._shards.values():
                with contextlib.suppress(Exception):
                    shard.flush()
                shard.close()
            self._shards.clear()


def _hit(point_id: Any, score: float, payload: dict | None) -> ContextHit:
    payload = dict(payload or {})
    return ContextHit(
        id=str(point_id), score=float(score), text=str(payload.get("text", "")), payload=payload
    )


def _point(point_id: Any, vector: Any, payload: dict | None) -> ContextPoint:
    if isinstance(vector, dict):  # the default (unnamed) vector, as some engines name it
        vector = vector.get("", next(iter(vector.values())))
    return ContextPoint(id=str(point_id), vector=list(vector), payload=dict(payload or {}))


# --- the store -----------------------------------------------------------------------


class VectorStore:
    """Agent context, by tenant. Every method that reads, writes, counts or deletes
    points takes a `TenantScope` and refuses to run without one.

    `layout` is where new context goes and where searches look ("shared" or
    "per_agent"); deletes reach both layouts, so nothing is left behind by a half-done
    migration.
    """

    def __init__(
        self,
        *,
        layout: str,
        shared_engine: Any,
        agent_engine: Any,
        agent_present: Any,
        folder_lock: int | None = None,
    ) -> None:
        if layout not in ("shared", "per_agent"):
            raise ValueError(f"unknown vector layout {layout!r}")
        self.layout = layout
        # The embedded folder's flock (open_store), released after the engines close.
        self._folder_lock = folder_lock
        # Called first on close (the owner's service stops serving: context.store_owner).
        self.on_close: list[Any] = []
        # Engines are opened on first use: a store that serves the shared layout never
        # loads a local-mode folder of per-agent collections it does not need.
        self._open_shared = shared_engine
        self._open_agent = agent_engine
        self._agent_present = agent_present
        self._engines: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._ensured: set[str] = set()
        # (engine kind, collection) -> has the sparse vector, or when to look again.
        self._sparse: dict[tuple[str, str], bool | float] = {}

    # --- engines ---------------------------------------------------------------------

    def _engine(self, kind: str) -> Any:
        engine = self._engines.get(kind)
        if engine is None:
            with self._lock:
                engine = self._engines.get(kind)
                if engine is None:
                    opener = self._open_shared if kind == "shared" else self._open_agent
                    engine = self._engines[kind] = opener()
        return engine

    def _shared(self) -> Any:
        return self._engine("shared")

    def _per_agent(self) -> Any:
        return self._engine("per_agent")

    def _per_agent_in_use(self) -> bool:
        """Whether per-agent collections may exist (without opening their folder)."""
        return self.layout == "per_agent" or "per_agent" in self._engines or self._agent_present()

    def open(self) -> VectorStore:
        """Open the engines the layout uses now (the worker's first task, a benchmark)."""
        self._engine("shared" if self.layout == "shared" else "per_agent")
        return self

    def shared_collections(self) -> list[str]:
        return [n for n in self._shared().collections() if n.startswith(SHARED_PREFIX)]

    def agent_collections(self) -> list[str]:
        if not self._per_agent_in_use():
            return []
        return [n for n in self._per_agent().collections() if COLLECTION_RE.match(n)]

    def _ensure_shared(self, name: str, *, dim: int) -> None:
        if name not in self._ensured:
            self._shared().create(name, dim=dim, shared=True)
            self._ensured.add(name)

    def _has_sparse(self, kind: str, name: str) -> bool:
        """Whether a collection holds sparse vectors (every collection made since they
        exist does; older ones get them from `sparse_reindex`)."""
        known = self._sparse.get((kind, name))
        if known is True:
            return True
        if isinstance(known, float) and known > time.monotonic():
            return False
        has = bool(self._engine(kind).has_sparse(name))
        self._sparse[(kind, name)] = True if has else time.monotonic() + SPARSE_RECHECK_SECONDS
        if not has:
            logger.warning(
                "collection %s has no sparse vectors: searched by dense vectors only until "
                "`manage.py context_sparse_reindex` gives it some",
                name,
            )
        return has

    @staticmethod
    def _sparse_of(points: list[ContextPoint]) -> list[Sparse]:
        return [passage_sparse(str(p.payload.get("text", ""))) for p in points]

    # --- by tenant -------------------------------------------------------------------

    def upsert(
        self,
        scope: TenantScope,
        points: Iterable[ContextPoint],
        *,
        model: str,
        dim: int,
        layout: str | None = None,
    ) -> int:
        """Store points in an agent's context; their tenant fields come from the scope
        (a payload cannot claim another tenant)."""
        scope = require_scope(scope, agent=True)
        tenant = scope.payload()
        batch = [ContextPoint(p.id, p.vector, {**p.payload, **tenant}) for p in points]
        if not batch:
            return 0
        if (layout or self.layout) == "shared":
            kind, name = "shared", shared_collection_name(model=model, dim=dim)
            self._ensure_shared(name, dim=dim)
            where = _Where.shared(scope, name)
        else:
            kind, name = "per_agent", scope.collection
            self._per_agent().create(name, dim=dim, shared=False)
            where = _Where.own_collection(scope)
        sparse = self._sparse_of(batch) if self._has_sparse(kind, name) else None
        self._engine(kind).upsert(where, batch, sparse)
        return len(batch)

    def search(
        self,
        scope: TenantScope,
        vector: list[float] | None,
        *,
        k: int,
        model: str,
        dim: int,
        query: str = "",
        mode: str = "dense",
        prefetch: int = 0,
    ) -> list[ContextHit]:
        """The k best points of an agent's context for `query` (and its dense `vector`):
        by dense similarity, by BM25-like terms (sparse), or both fused by reciprocal
        rank (hybrid; each list `prefetch` long). None stored yet is none found. A
        collection without sparse vectors yet is searched densely."""
        scope = require_scope(scope, agent=True)
        if mode not in SEARCH_MODES:
            raise ValueError(f"unknown search mode {mode!r}")
        if k <= 0:
            return []
        if self.layout == "shared":
            kind, name = "shared", shared_collection_name(model=model, dim=dim)
            if not self._shared().exists(name):
                return []
            where = _Where.shared(scope, name)
        else:
            kind, name = "per_agent", scope.collection
            if not self._per_agent().exists(name):
                return []
            where = _Where.own_collection(scope)
        sparse, requested = None, mode
        if mode != "dense" and self._has_sparse(kind, name):
            sparse = query_sparse(query)
            if not sparse:  # nothing but stopwords: no term to match
                if mode == "sparse":
                    return []
                mode = "dense"
        elif mode != "dense":
            mode = "dense"
        if mode != "sparse" and vector is None:
            if requested == "sparse":
                return []  # asked without a vector of a collection that has no sparse one
            raise ValueError("a dense or hybrid search needs the query's vector")
        return self._engine(kind).query(
            where, vector, k=k, sparse=sparse, mode=mode, prefetch=max(prefetch, k)
        )

    def _places(self, scope: TenantScope) -> Iterator[tuple[Any, _Where]]:
        """Every (engine, where) that may hold points of the scope, in both layouts."""
        scope = require_scope(scope)
        shared = self._shared()
        for name in self.shared_collections():
            yield shared, _Where.shared(scope, name)
        if not self._per_agent_in_use():
            return
        per_agent = self._per_agent()
        for name in per_agent.collections():
            if name.startswith(scope.prefix) and (not scope.is_agent or name == scope.collection):
                own = TenantScope.of_collection(name)
                if own is not None:
                    yield per_agent, _Where.own_collection(own)

    def count(self, scope: TenantScope, *, collection: str | None = None) -> int:
        """How many points the scope holds (in every collection, or in one)."""
        total = 0
        for engine, where in self._places(scope):
            if collection is None or where.collection == collection:
                if where.must:
                    total += engine.count(where)
                else:
                    total += engine.count(where) if engine.exists(where.collection) else 0
        return total

    def delete(self, scope: TenantScope) -> list[str]:
        """Remove every point of the scope (an agent, or a whole project) in both layouts:
        by filter in shared collections, by dropping the agent's own collections.
        Returns the collections that held some."""
        removed = []
        for engine, where in list(self._places(scope)):
            if where.must:
                if engine.count(where):
                    engine.delete(where)
                    removed.append(where.collection)
            elif engine.drop(where.collection):
                removed.append(where.collection)
        return removed

    def delete_verified(self, scope: TenantScope) -> list[str]:
        """`delete`, then check that nothing of the scope is left (raises if some is)."""
        removed = self.delete(scope)
        left = self.count(scope)
        if left:
            raise RuntimeError(f"{left} points of {scope} are still stored after the delete")
        return removed

    def forget(self, scope: TenantScope, ids: list[str], *, model: str, dim: int) -> None:
        """Remove some of an agent's points by id from where `upsert` stores them (an
        exchange a regenerated answer replaced)."""
        scope = require_scope(scope, agent=True)
        if not ids:
            return
        if self.layout == "shared":
            name = shared_collection_name(model=model, dim=dim)
            if self._shared().exists(name):
                self._shared().delete(_Where.shared(scope, name), _with_ids(ids))
        elif self._per_agent().exists(scope.collection):
            self._per_agent().delete(_Where.own_collection(scope), _with_ids(ids))

    def delete_points(self, scope: TenantScope, ids: list[str], *, collection: str) -> None:
        """Remove some points of an agent from one shared collection (re-embedding)."""
        scope = require_scope(scope, agent=True)
        self._shared().delete(_Where.shared(scope, collection), _with_ids(ids))

    def scroll(
        self,
        scope: TenantScope,
        *,
        collection: str,
        offset: Any = None,
        limit: int = 256,
        ids: list[str] | None = None,
    ) -> tuple[list[ContextPoint], Any]:
        """A page of an agent's points (with vectors) in one collection: its own
        (per_agent) or a shared one. Returns (points, the next page's offset or None)."""
        scope = require_scope(scope, agent=True)
        if collection == scope.collection:
            if not self._per_agent().exists(collection):
                return [], None
            return self._per_agent().scroll(
                _Where.own_collection(scope), offset=offset, limit=limit, ids=ids
            )
        if not self._shared().exists(collection):
            return [], None
        return self._shared().scroll(
            _Where.shared(scope, collection), offset=offset, limit=limit, ids=ids
        )

    def agent_collection_dim(self, scope: TenantScope) -> int:
        scope = require_scope(scope, agent=True)
        return self._per_agent().dim(scope.collection)

    def drop_agent_collection(self, scope: TenantScope) -> bool:
        """Drop an agent's own collection (per_agent)."""
        scope = require_scope(scope, agent=True)
        if not self._per_agent_in_use():
            return False
        return self._per_agent().drop(scope.collection)

    # --- tenants (names, not points) -------------------------------------------------

    def contexts(self) -> dict[str, set[TenantScope]]:
        """Which agents hold context where: collection -> agent scopes. Shared
        collections list their agents from the `collection` payload index; a per-agent
        collection is one agent."""
        found: dict[str, set[TenantScope]] = {}
        shared = self._shared()
        for name in self.shared_collections():
            scopes = {TenantScope.of_collection(str(v)) for v in shared.values(name, "collection")}
            found[name] = {s for s in scopes if s is not None}
        for name in self.agent_collections():
            own = TenantScope.of_collection(name)
            if own is not None:
                found.setdefault(name, set()).add(own)
        return found

    # --- sparse vectors for collections made before them -----------------------------

    def sparse_reindex(self, *, batch: int = 256, progress: Any = None) -> dict[str, int]:
        """Give every collection of both layouts sparse vectors computed from its points'
        text; returns collection -> points indexed. Resumable and idempotent: run it
        again after an interruption and it carries on.

        A Qdrant Edge shard gets the sparse vector in place, then its points get their
        vectors page by page. qdrant-client (a server, local mode) cannot add a vector
        to an existing collection, so such a collection is rebuilt: copied whole into a
        side collection that has the sparse vector (`…__sparse`), dropped, made again,
        copied back, and the side dropped; an interrupted rebuild resumes from whichever
        of the two still holds the points. Stop the workers first (writes during a
        rebuild could be lost; local mode serves one process anyway).
        """
        say = progress or (lambda _msg: None)
        done: dict[str, int] = {}
        kinds = [("shared", n) for n in self.shared_collections()]
        if self._per_agent_in_use():
            engine = self._per_agent()
            kinds += [("per_agent", n) for n in engine.collections() if COLLECTION_RE.match(n)]
            # Side copies left by an interrupted rebuild whose original was dropped.
            kinds += [
                ("per_agent", n.removesuffix(REBUILD_SUFFIX))
                for n in engine.collections()
                if n.endswith(REBUILD_SUFFIX)
                and COLLECTION_RE.match(n.removesuffix(REBUILD_SUFFIX))
                and not engine.exists(n.removesuffix(REBUILD_SUFFIX))
            ]
        for kind, name in kinds:
            engine = self._engine(kind)
            shared = kind == "shared"
            if engine.add_sparse(name):
                count = self._sparse_fill(engine, name, shared=shared, batch=batch)
            else:
                count = self._sparse_rebuild(engine, name, shared=shared, batch=batch)
            self._sparse.pop((kind, name), None)
            done[name] = count
            say(f"{name}: {count} points with sparse vectors")
        return done

    def _wheres(self, engine: Any, name: str, *, shared: bool) -> list[_Where]:
        """One _Where per agent of a collection (or of its rebuild's side copy)."""
        if not shared:
            own = TenantScope.of_collection(name.removesuffix(REBUILD_SUFFIX))
            return [_Where(name, (), own)] if own is not None else []
        wheres = []
        for value in engine.values(name, "collection"):
            scope = TenantScope.of_collection(str(value))
            if scope is not None:
                wheres.append(_Where(name, tuple(sorted(scope.conditions().items())), scope))
        return wheres

    def _sparse_fill(self, engine: Any, name: str, *, shared: bool, batch: int) -> int:
        count = 0
        for where in self._wheres(engine, name, shared=shared):
            offset = None
            while True:
                points, offset = engine.scroll(where, offset=offset, limit=batch)
                if points:
                    sparse = self._sparse_of(points)
                    engine.set_sparse(
                        where, [(p.id, v) for p, v in zip(points, sparse, strict=True)]
                    )
                    count += len(points)
                if offset is None:
                    break
        return count

    def _sparse_copy(self, engine: Any, source: str, target: str, *, shared: bool, batch: int):
        count = 0
        for where in self._wheres(engine, source, shared=shared):
            into = _Where(target, where.must, where.scope)
            offset = None
            while True:
                points, offset = engine.scroll(where, offset=offset, limit=batch)
                if points:
                    engine.upsert(into, points, self._sparse_of(points))
                    count += len(points)
                if offset is None:
                    break
        return count

    def _sparse_rebuild(self, engine: Any, name: str, *, shared: bool, batch: int) -> int:
        side = name + REBUILD_SUFFIX
        count = 0
        if engine.exists(name) and not engine.has_sparse(name):
            dim = engine.dim(name)
            engine.create(side, dim=dim, shared=shared)
            self._sparse_copy(engine, name, side, shared=shared, batch=batch)
            engine.drop(name)
        if engine.exists(side):
            engine.create(name, dim=engine.dim(side), shared=shared)
            count = self._sparse_copy(engine, side, name, shared=shared, batch=batch)
            engine.drop(side)
        # Else the collection was made with the sparse vector: every point has one.
        return count

    def optimize(self) -> None:
        shared = self._shared()
        for name in self.shared_collections():
            shared.optimize(name)

    def purge_deleted(self) -> None:
        """Make deleted points unrecoverable from the embedded store's files (a Qdrant
        server vacuums on its own schedule: its operator's concern)."""
        purge = getattr(self._shared(), "purge_deleted", None)
        if purge is not None:
            purge()

    def close(self) -> None:
        while self.on_close:
            self.on_close.pop(0)()
        for engine in self._engines.values():
            engine.close()
        self._engines.clear()
        self._ensured.clear()
        if self._folder_lock is not None:
            os.close(self._folder_lock)  # releases the flock
            self._folder_lock = None


def _client_engine_unavailable(exc: RuntimeError) -> RuntimeError:
    return RuntimeError(f"{exc}{UNAVAILABLE_HINT}")


FOLDER_LOCK = ".owner.lock"


def _lock_folder(path: Path) -> int:
    """Hold the embedded folder for this process (an flock the kernel lets go when the
    process dies): two processes never both open it, even where each engine alone
    would let them (a fresh Edge folder has no shard to lock yet)."""
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path / FOLDER_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RuntimeError(
            f"Storage folder {path} is already accessed by another instance." + UNAVAILABLE_HINT
        ) from None
    return fd


def open_store(*, layout: str | None = None) -> VectorStore:
    """The store for settings.QDRANT_URL, or the embedded engines under
    settings.QDRANT_PATH (see the module's docstring)."""
    layout = layout or settings.VECTOR_LAYOUT
    if settings.QDRANT_URL:
        # Here, not at the top: see _ClientEngine (qdrant_client only where it is used).
        from qdrant_client import QdrantClient

        client = QdrantClient(url=settings.QDRANT_URL, api_key=settings.QDRANT_API_KEY or None)
        engine = _ClientEngine(client, local=False)
        return VectorStore(
            layout=layout,
            shared_engine=lambda: engine,
            agent_engine=lambda: engine,
            agent_present=lambda: True,
        )
    path = Path(settings.QDRANT_PATH)

    def agent_engine() -> _ClientEngine:
        # Here, not at the top: see _ClientEngine.
        from qdrant_client import QdrantClient

        try:
            client = QdrantClient(path=str(path))
        except RuntimeError as exc:
            raise _client_engine_unavailable(exc) from exc
        return _ClientEngine(client, local=True)

    def agent_present() -> bool:
        # Local mode keeps one folder per collection under "collection/".
        folder = path / "collection"
        return folder.is_dir() and any(folder.iterdir())

    return VectorStore(
        layout=layout,
        shared_engine=lambda: _EdgeEngine(path / EDGE_DIR),
        agent_engine=agent_engine,
        agent_present=agent_present,
        folder_lock=_lock_folder(path),
    )
