"""The vector store by tenant, in both layouts: no query, count or delete crosses a
tenant, a call without a tenant is refused, and moves between layouts and embedding
models keep every point."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
from django.core.management import CommandError, call_command

from context import vector_moves
from context.embeddings import get_embedder
from context.qdrant_store import VectorStore, _ClientEngine, _Where
from context.vectors import project_collections_drop
from context.vectorstore import (
    ContextPoint,
    TenantScope,
    TenantScopeRequired,
    close_vector_store,
    get_vector_store,
    shared_collection_name,
)

DIM, MODEL = 8, "test-model"
SHARED = shared_collection_name(model=MODEL, dim=DIM)


@pytest.fixture
def layout_store(request, runtime_settings, tmp_path):
    """A store of this test's own (Qdrant local mode and Edge in a fresh folder).

    "shared_client" is the shared layout on qdrant-client's engine, as it runs against a
    Qdrant server (QDRANT_URL), here over an in-memory local client.
    """
    layout = getattr(request, "param", "shared")
    runtime_settings.QDRANT_PATH = str(tmp_path / "qdrant")
    runtime_settings.VECTOR_LAYOUT = "shared" if layout == "shared_client" else layout
    close_vector_store()
    if layout == "shared_client":
        # qdrant-client loads only for its layout
        from qdrant_client import QdrantClient

        engine = _ClientEngine(QdrantClient(location=":memory:"), local=True)
        store = VectorStore(
            layout="shared",
            shared_engine=lambda: engine,
            agent_engine=lambda: engine,
            agent_present=lambda: True,
        )
        yield store
        store.close()
    else:
        yield get_vector_store()
    close_vector_store()


both_layouts = pytest.mark.parametrize(
    "layout_store", ["shared", "per_agent", "shared_client"], indirect=True
)


def vec(seed: int) -> list[float]:
    return np.random.default_rng(seed).standard_normal(DIM).astype(float).tolist()


def fill(store, scope: TenantScope, n: int, *, seed: int = 0, model: str = MODEL, dim=DIM):
    points = [
        ContextPoint(
            # Named by the agent's logical collection, as chunking.point_id names them.
            id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"{scope.collection}/{seed}/{i}")),
            vector=np.random.default_rng(seed * 1000 + i).standard_normal(dim).tolist(),
            payload={"text": f"{scope.collection} #{i}", "kind": "document"},
        )
        for i in range(n)
    ]
    store.upsert(scope, points, model=model, dim=dim)
    return points


def tenants():
    """Two users; user 1 has two projects; the same agent uuid appears under two
    projects (ids are unique in the database, but the store must not rely on it)."""
    shared_agent = uuid.uuid4()
    p1, p2, p3 = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    return {
        "u1p1a": TenantScope.agent(user_id=1, project_id=p1, agent_id=shared_agent),
        "u1p1b": TenantScope.agent(user_id=1, project_id=p1, agent_id=uuid.uuid4()),
        "u1p2a": TenantScope.agent(user_id=1, project_id=p2, agent_id=shared_agent),
        "u2p3a": TenantScope.agent(user_id=2, project_id=p3, agent_id=uuid.uuid4()),
        # Same project id, other user: a forged scope must see nothing of user 1's.
        "u2p1x": TenantScope.agent(user_id=2, project_id=p1, agent_id=shared_agent),
    }


@both_layouts
def test_no_query_count_or_delete_crosses_a_tenant(layout_store):
    store, scopes = layout_store, tenants()
    sizes = {"u1p1a": 3, "u1p1b": 4, "u1p2a": 5, "u2p3a": 6}
    points = {key: fill(store, scopes[key], n, seed=7) for key, n in sizes.items()}
    # Identical vectors in every tenant: only the filter keeps them apart.
    probe = points["u1p1a"][0].vector

    for key, n in sizes.items():
        hits = store.search(scopes[key], probe, k=50, model=MODEL, dim=DIM)
        assert {h.id for h in hits} == {p.id for p in points[key]}
        assert all(h.text.startswith(scopes[key].collection) for h in hits)
        assert store.count(scopes[key]) == n
    assert store.search(scopes["u2p1x"], probe, k=50, model=MODEL, dim=DIM) == []
    assert store.count(scopes["u2p1x"]) == 0
    project1 = TenantScope.project(user_id=1, project_id=scopes["u1p1a"].project_id)
    assert store.count(project1) == 7

    # Deleting one agent, then a forged scope, then one project touches nobody else.
    store.delete(scopes["u1p1b"])
    assert store.count(scopes["u1p1b"]) == 0 and store.count(project1) == 3
    store.delete(TenantScope.project(user_id=2, project_id=scopes["u1p1a"].project_id))
    assert store.count(project1) == 3
    assert store.delete_verified(project1)
    assert store.count(project1) == 0
    assert store.count(scopes["u1p2a"]) == 5 and store.count(scopes["u2p3a"]) == 6
    hits = store.search(scopes["u1p2a"], probe, k=50, model=MODEL, dim=DIM)
    assert {h.id for h in hits} == {p.id for p in points["u1p2a"]}


@both_layouts
def test_a_call_without_a_tenant_is_refused(layout_store):
    store = layout_store
    scope = tenants()["u1p1a"]
    fill(store, scope, 2)
    project = TenantScope.project(user_id=1, project_id=scope.project_id)
    point = ContextPoint(str(uuid.uuid4()), vec(1), {"text": "x"})
    for call in (
        lambda: store.search(None, vec(1), k=3, model=MODEL, dim=DIM),
        lambda: store.search(project, vec(1), k=3, model=MODEL, dim=DIM),  # not an agent
        lambda: store.count(None),
        lambda: store.count("user_1"),
        lambda: store.delete(None),
        lambda: store.delete({"user_id": 1}),
        lambda: store.delete_verified(None),
        lambda: store.upsert(None, [point], model=MODEL, dim=DIM),
        lambda: store.upsert(project, [point], model=MODEL, dim=DIM),
        lambda: store.scroll(None, collection=SHARED),
        lambda: store.delete_points(None, [point.id], collection=SHARED),
        # A scope is checked when it is made: it always names a tenant.
        lambda: TenantScope(user_id="1", project_id=scope.project_id),
        lambda: TenantScope(user_id=1, project_id=str(scope.project_id)),
        lambda: _Where.shared(None, SHARED),
    ):
        with pytest.raises(TenantScopeRequired):
            call()
    # The engines below the store refuse anything but a tenant's _Where, and a payload
    # filter without the tenant field.
    engine = store._shared()
    forged = _Where(SHARED, (("agent_id", scope.agent_id.hex),), scope)
    for call in (
        lambda: engine.query(SHARED, vec(1), k=3),
        lambda: engine.count(None),
        lambda: engine.delete({"collection": SHARED}),
        lambda: engine.scroll(SHARED, offset=None, limit=10),
        lambda: engine.count(forged),
        lambda: engine.delete(forged),
    ):
        with pytest.raises(TenantScopeRequired):
            call()
    assert store.count(scope) == 2  # nothing was touched


def test_a_payload_cannot_claim_another_tenant(layout_store):
    scopes = tenants()
    mine, theirs = scopes["u1p1a"], scopes["u2p3a"]
    forged = {"text": "x", "user_id": 2, "project_id": theirs.project_id.hex, "agent_id": "x"}
    layout_store.upsert(
        mine, [ContextPoint(str(uuid.uuid4()), vec(2), forged)], model=MODEL, dim=DIM
    )
    assert layout_store.count(theirs) == 0 and layout_store.count(mine) == 1
    (hit,) = layout_store.search(mine, vec(2), k=1, model=MODEL, dim=DIM)
    assert hit.payload["project_id"] == mine.project_id.hex and hit.payload["user_id"] == 1
    assert hit.payload["collection"] == mine.collection


def test_the_shared_collection_indexes_its_tenant_field(layout_store):
    scope = tenants()["u1p1a"]
    fill(layout_store, scope, 2)
    assert layout_store.shared_collections() == [SHARED]
    assert layout_store.agent_collections() == []  # nothing per agent in this layout
    schema = layout_store._shared()._shards[SHARED].info().payload_schema
    assert schema["project_id"].params.is_tenant is True
    assert set(schema) >= {"project_id", "agent_id", "collection", "user_id"}


def test_a_new_embedding_model_writes_a_collection_of_its_own(layout_store):
    scope = tenants()["u1p1a"]
    fill(layout_store, scope, 3)
    fill(layout_store, scope, 2, seed=9, model="next-model", dim=4)
    assert layout_store.shared_collections() == [
        "context_next-model_4",
        SHARED,
    ]
    assert len(layout_store.search(scope, vec(1), k=10, model=MODEL, dim=DIM)) == 3
    assert len(layout_store.search(scope, [1, 0, 0, 0], k=10, model="next-model", dim=4)) == 2
    assert layout_store.count(scope) == 5


def snapshot(store, scopes, collection_of) -> dict[str, tuple]:
    """Every point of these agents, by id: (payload without tenant fields, unit vector)."""
    found = {}
    for scope in scopes:
        offset = None
        while True:
            points, offset = store.scroll(
                scope, collection=collection_of(scope), offset=offset, limit=5
            )
            for p in points:
                payload = {k: v for k, v in p.payload.items() if k in ("text", "kind")}
                v = np.array(p.vector)
                found[p.id] = (payload, tuple(np.round(v / np.linalg.norm(v), 5)))
            if offset is None:
                break
    return found


@pytest.mark.parametrize("layout_store", ["per_agent"], indirect=True)
def test_migration_both_ways_keeps_every_point_and_resumes(layout_store):
    store, scopes = layout_store, list(tenants().values())[:4]
    for n, scope in enumerate(scopes):
        fill(store, scope, 10 + n, seed=n)
    before = snapshot(store, scopes, lambda s: s.collection)
    assert len(before) == sum(10 + n for n in range(4))

    # Interrupted after the first agent (a crash, Ctrl-C): run again, it finishes.
    class Interrupted(Exception):
        pass

    def stop_after_first(line):
        raise Interrupted(line)

    with pytest.raises(Interrupted):
        vector_moves.layout_migrate(to="shared", batch=3, model=MODEL, progress=stop_after_first)
    assert len(store.agent_collections()) == 3
    call_command("vectors_migrate", to="shared", batch=3, model=MODEL)
    assert store.agent_collections() == [] and store.shared_collections() == [SHARED]
    assert snapshot(store, scopes, lambda s: SHARED) == before
    for scope in scopes:  # the tenant fields came from the collection names
        (hit,) = store.scroll(scope, collection=SHARED, limit=1)[0]
        assert hit.payload["collection"] == scope.collection
    # Idempotent: nothing left to move.
    assert vector_moves.layout_migrate(to="shared", batch=3, model=MODEL).points == 0

    call_command("vectors_migrate", to="per_agent", batch=4)
    assert snapshot(store, scopes, lambda s: s.collection) == before
    assert sum(store.count(s) for s in scopes) == len(before)  # none left in shared
    assert snapshot(store, scopes, lambda s: SHARED) == {}


def test_migrate_refuses_bad_input(layout_store):
    with pytest.raises(CommandError):
        call_command("vectors_migrate", to="shared", batch=0)
    with pytest.raises(CommandError):
        call_command("vectors_migrate", to="sideways")


def test_reembed_moves_an_agents_context_to_the_new_model(layout_store):
    store, scopes = layout_store, tenants()
    old = [
        ContextPoint(str(uuid.uuid4()), vec(i), {"text": text, "kind": "document"})
        for i, text in enumerate(["The cat is called Barsik.", "Invoices are due on Friday."])
    ]
    exchange = ContextPoint(
        str(uuid.uuid4()),
        vec(5),
        {"text": "User: Where is the VPN guide?\nAssistant: On the wiki.", "kind": "exchange"},
    )
    remembered = ContextPoint(  # a question remembered by its search vector
        str(uuid.uuid4()),
        vec(6),
        {
            "text": "User: Who signs the invoices?\nAssistant: Olga.",
            "kind": "exchange",
            "embedded_text": "Who signs the invoices?",
            "embedded_as": "query",
        },
    )
    old.append(remembered)
    store.upsert(scopes["u1p1a"], [*old, exchange], model="old-model", dim=DIM)
    fill(store, scopes["u1p2a"], 3, model="old-model")
    call_command("vectors_reembed", project=scopes["u1p1a"].project_id, batch=2)

    embedder = get_embedder()
    new = shared_collection_name(model=embedder.name, dim=embedder.dim)
    moved = store.scroll(scopes["u1p1a"], collection=new)[0]
    assert {p.id for p in moved} == {p.id for p in [*old, exchange]}
    assert store.scroll(scopes["u1p1a"], collection="context_old-model_8")[0] == []
    # Another project's context was not asked for: it stays where it was.
    assert len(store.scroll(scopes["u1p2a"], collection="context_old-model_8")[0]) == 3
    hits = store.search(
        scopes["u1p1a"],
        embedder.query("what is the cat's name"),
        k=1,
        model=embedder.name,
        dim=embedder.dim,
    )
    assert "Barsik" in hits[0].text
    # Each point is embedded again as it was first: a query stays a query.
    by_id = {p.id: p.vector for p in moved}
    for point, expected in (
        (remembered, embedder.query("Who signs the invoices?")),
        (old[0], embedder.passages(["The cat is called Barsik."])[0]),
    ):
        assert max(abs(a - b) for a, b in zip(by_id[point.id], expected, strict=True)) < 1e-4
    assert vector_moves.embedded_text(exchange.payload) == "Where is the VPN guide?"


@pytest.mark.parametrize("layout_store", ["per_agent"], indirect=True)
def test_reembed_needs_the_shared_layout(layout_store):
    with pytest.raises(CommandError, match="VECTOR_LAYOUT=shared"):
        call_command("vectors_reembed")


def test_project_delete_reaches_both_layouts_and_verifies(layout_store, runtime_settings):
    """A half-done migration leaves a project's context in both layouts: the teardown's
    delete finds it in both, and checks that nothing is left."""
    scopes = tenants()
    fill(layout_store, scopes["u1p1a"], 3)
    fill(layout_store, scopes["u1p2a"], 2)
    layout_store.upsert(
        scopes["u1p1b"],
        [ContextPoint(str(uuid.uuid4()), vec(3), {"text": "own"})],
        model=MODEL,
        dim=DIM,
        layout="per_agent",
    )
    project = TenantScope.project(user_id=1, project_id=scopes["u1p1a"].project_id)
    assert layout_store.count(project) == 4
    removed = project_collections_drop(user_id=1, project_id=project.project_id)
    assert sorted(removed) == sorted([SHARED, scopes["u1p1b"].collection])
    assert layout_store.count(project) == 0 and layout_store.count(scopes["u1p2a"]) == 2
    assert project_collections_drop(user_id=1, project_id=project.project_id) == []
