"""Hybrid retrieval in the vector store: every point gets a sparse (BM25-like) vector
beside its dense one, in both layouts and on both engines; sparse search finds the one
chunk holding an exact identifier that random dense vectors cannot, hybrid fuses both
lists, tenants stay apart, and collections made before sparse vectors get them from the
re-index command (in place on Edge, by a resumable rebuild on qdrant-client)."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
from django.core.management import call_command

from context.qdrant_store import REBUILD_SUFFIX, VectorStore, _ClientEngine, _Where
from context.sparse import passage_sparse, query_sparse, terms
from context.vectorstore import ContextPoint, TenantScope, close_vector_store, get_vector_store
from tests.runtime.test_vectors import DIM, MODEL, SHARED, layout_store  # noqa: F401

all_layouts = pytest.mark.parametrize(
    "layout_store", ["shared", "per_agent", "shared_client"], indirect=True
)


def scope(n: int = 0) -> TenantScope:
    return TenantScope.agent(user_id=1, project_id=uuid.UUID(int=7), agent_id=uuid.UUID(int=n + 1))


def texts() -> list[str]:
    filler = "the interpreter evaluates expressions and statements in order"
    docs = [f"{filler} section {i} about loops and functions" for i in range(40)]
    docs[17] = "Raise the limit with sys.setrecursionlimit before deep recursion ERR-4021"
    return docs


def put(store, who: TenantScope, docs: list[str]) -> list[ContextPoint]:
    points = [
        ContextPoint(
            id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"{who.collection}/{i}")),
            vector=np.random.default_rng(i).standard_normal(DIM).tolist(),
            payload={"text": text, "kind": "document"},
        )
        for i, text in enumerate(docs)
    ]
    store.upsert(who, points, model=MODEL, dim=DIM)
    return points


def search(store, who, query, mode, k=5):
    vector = np.random.default_rng(999).standard_normal(DIM).tolist()
    return store.search(who, vector, k=k, model=MODEL, dim=DIM, query=query, mode=mode)


def test_terms_keep_identifiers_and_their_parts():
    found = terms("Call sys.setrecursionlimit(3000) or __init__; ERR-4021 in 3.12")
    for term in ("sys.setrecursionlimit", "sys", "setrecursionlimit", "3000", "__init__"):
        assert term in found
    assert "err-4021" in found and "4021" in found and "3.12" in found
    assert "or" not in found and "in" not in found  # stopwords
    assert query_sparse("the of and") == query_sparse("")
    vector = passage_sparse("alpha alpha beta")
    assert len(vector.indices) == 2 and vector.indices == sorted(vector.indices)


@all_layouts
def test_sparse_and_hybrid_find_the_exact_identifier(layout_store):  # noqa: F811
    store = layout_store
    points = put(store, scope(0), texts())
    put(store, scope(1), ["sys.setrecursionlimit ERR-4021 of another agent"])
    target = points[17].id
    for query in ("sys.setrecursionlimit", "what does ERR-4021 mean"):
        sparse = search(store, scope(0), query, "sparse")
        assert sparse[0].id == target
        assert target in [h.id for h in search(store, scope(0), query, "hybrid")]
    # Other tenants' points are never found; a query of stopwords matches no term.
    assert all(h.payload["agent_id"] == scope(0).agent_id.hex for h in
               search(store, scope(0), "sys.setrecursionlimit", "hybrid", k=50))  # fmt: skip
    assert search(store, scope(0), "the of and", "sparse") == []
    assert len(search(store, scope(0), "the of and", "hybrid")) == 5  # dense only
    with pytest.raises(ValueError):
        search(store, scope(0), "x", "fuzzy")


@pytest.mark.parametrize("layout_store", ["shared", "per_agent"], indirect=True)
def test_reindex_gives_old_collections_sparse_vectors(layout_store, runtime_settings):  # noqa: F811
    """Collections made before sparse vectors existed: searched densely until the
    re-index command runs, then sparse search works; a second run does no harm."""
    store = layout_store
    who = scope(0)
    # A collection as the previous version made it: dense vectors only.
    if store.layout == "shared":
        # the engines load only for the layout they serve (Qdrant Edge here)
        import qdrant_edge as e

        engine = store._shared()
        shard = e.EdgeShard.create(
            str(engine.root / SHARED),
            e.EdgeConfig(vectors=e.EdgeVectorParams(size=DIM, distance=e.Distance.Cosine)),
        )
        for field in ("project_id", "agent_id", "collection"):
            shard.update(e.UpdateOperation.create_field_index(field, e.KeywordIndexParams()))
        engine._shards[SHARED] = shard
        store._ensured.add(SHARED)
    else:
        # the engines load only for the layout they serve (qdrant-client here)
        from qdrant_client import models

        client = store._per_agent()._client
        client.create_collection(
            who.collection,
            vectors_config=models.VectorParams(size=DIM, distance=models.Distance.COSINE),
        )
    points = put(store, who, texts())
    kind = "shared" if store.layout == "shared" else "per_agent"
    name = SHARED if kind == "shared" else who.collection
    assert not store._engine(kind).has_sparse(name)
    # Sparse asked of an old collection: the dense search answers instead.
    assert len(search(store, who, "sys.setrecursionlimit", "sparse")) == 5
    close_vector_store()

    call_command("context_sparse_reindex")
    call_command("context_sparse_reindex")  # idempotent

    store = get_vector_store()
    assert store._engine(kind).has_sparse(name)
    assert store.count(who) == len(points)
    assert search(store, who, "sys.setrecursionlimit", "sparse")[0].id == points[17].id
    assert not store._engine(kind).exists(name + REBUILD_SUFFIX)


def test_interrupted_rebuild_resumes_from_the_side_copy(tmp_path):
    """qdrant-client (server, local mode): a rebuild stopped after the original was
    dropped finds every point in the side copy and finishes."""
    # qdrant-client loads only in the tests that use it
    from qdrant_client import QdrantClient, models

    engine = _ClientEngine(QdrantClient(location=":memory:"), local=True)
    store = VectorStore(
        layout="per_agent",
        shared_engine=lambda: engine,
        agent_engine=lambda: engine,
        agent_present=lambda: True,
    )
    who = scope(0)
    side = who.collection + REBUILD_SUFFIX
    engine._client.create_collection(
        side, vectors_config=models.VectorParams(size=DIM, distance=models.Distance.COSINE)
    )
    docs = texts()
    points = [
        ContextPoint(
            str(uuid.uuid5(uuid.NAMESPACE_URL, str(i))),
            [float(i + 1)] * DIM,
            {"text": t, **who.payload()},
        )  # fmt: skip
        for i, t in enumerate(docs)
    ]
    engine.upsert(_Where(side, (), who), points)
    assert not engine.exists(who.collection)

    done = store.sparse_reindex(batch=7)

    assert done[who.collection] == len(docs)
    assert not engine.exists(side)
    assert store.count(who) == len(docs)
    assert search(store, who, "ERR-4021", "sparse")[0].id == points[17].id
    store.close()
