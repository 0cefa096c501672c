"""Moving agent context between layouts (`manage.py vectors_migrate`) and between
embedding models (`manage.py vectors_reembed`).

Both are resumable and idempotent because a point keeps its id wherever it goes (the id
is named by the agent's logical collection and the text, see chunking.point_id): a move
that stopped half-way is simply run again, copies what it had copied onto itself, and
carries on. A source is removed only once every one of its points is found at the
destination, so a move never loses a point.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from .embeddings import get_embedder
from .vectors import EMBED_BATCH
from .vectorstore import SHARED_RE, TenantScope, get_vector_store, shared_collection_name

Progress = Callable[[str], None]


@dataclass
class MoveReport:
    agents: int = 0
    points: int = 0
    skipped: list[str] = field(default_factory=list)


def _wanted(scope: TenantScope, project_id: uuid.UUID | None, agent_id: uuid.UUID | None) -> bool:
    return (project_id is None or scope.project_id == project_id) and (
        agent_id is None or scope.agent_id == agent_id
    )


def _missing(scope: TenantScope, ids: list[str], *, collection: str, batch: int) -> set[str]:
    """Which of `ids` the scope does not hold in `collection`."""
    store, found = get_vector_store(), set()
    for i in range(0, len(ids), batch):
        chunk = ids[i : i + batch]
        points, _ = store.scroll(scope, collection=collection, limit=len(chunk), ids=chunk)
        found.update(p.id for p in points)
    return set(ids) - found


def _copy(
    scope: TenantScope, *, source: str, to_layout: str, model: str, dim: int, batch: int
) -> list[str]:
    """Copy every point of the scope in `source` to the layout's collection; their ids."""
    store, ids, offset = get_vector_store(), [], None
    while True:
        points, offset = store.scroll(scope, collection=source, offset=offset, limit=batch)
        if points:
            store.upsert(scope, points, model=model, dim=dim, layout=to_layout)
            ids.extend(p.id for p in points)
        if offset is None:
            return ids


def layout_migrate(
    *,
    to: str,
    batch: int,
    project_id: uuid.UUID | None = None,
    model: str | None = None,
    progress: Progress = lambda line: None,
) -> MoveReport:
    """Move every agent's context (of one project, or all) into the `to` layout.

    per_agent -> shared: each agent collection goes to the shared collection of `model`
    (default: the configured embedder's) at the collection's dimension, then is dropped.
    shared -> per_agent: each agent's points in each shared collection go to the agent's
    own collection, then are deleted from the shared one.
    """
    if to not in ("shared", "per_agent"):
        raise ValueError(f"unknown layout {to!r}")
    store, report = get_vector_store(), MoveReport()
    if to == "shared":
        model = model or get_embedder().name
        sources = [
            (name, scope)
            for name in store.agent_collections()
            if (scope := TenantScope.of_collection(name)) and _wanted(scope, project_id, None)
        ]
        for n, (name, scope) in enumerate(sources, start=1):
            dim = store.agent_collection_dim(scope)
            ids = _copy(scope, source=name, to_layout="shared", model=model, dim=dim, batch=batch)
            target = shared_collection_name(model=model, dim=dim)
            if missing := _missing(scope, ids, collection=target, batch=batch):
                raise RuntimeError(f"{len(missing)} points of {name} did not reach {target}")
            store.drop_agent_collection(scope)
            report.agents += 1
            report.points += len(ids)
            progress(f"[{n}/{len(sources)}] {name}: {len(ids)} points -> {target}")
        return report
    contexts = store.contexts()
    sources = [
        (name, scope)
        for name in store.shared_collections()
        for scope in sorted(contexts.get(name, ()), key=lambda s: s.collection)
        if _wanted(scope, project_id, None)
    ]
    for n, (name, scope) in enumerate(sources, start=1):
        dim = int(SHARED_RE.match(name)[2])
        try:
            ids = _copy(scope, source=name, to_layout="per_agent", model="", dim=dim, batch=batch)
        except RuntimeError as exc:  # the agent already has a collection of another size
            report.skipped.append(f"{scope.collection} from {name}: {exc}")
            progress(f"[{n}/{len(sources)}] {scope.collection}: skipped: {exc}")
            continue
        if missing := _missing(scope, ids, collection=scope.collection, batch=batch):
            raise RuntimeError(f"{len(missing)} points of {scope.collection} were not copied")
        for i in range(0, len(ids), batch):
            store.delete_points(scope, ids[i : i + batch], collection=name)
        report.agents += 1
        report.points += len(ids)
        progress(f"[{n}/{len(sources)}] {scope.collection}: {len(ids)} points <- {name}")
    return report


def embedded_text(payload: dict) -> str:
    """What a point's vector embeds: the question of an exchange, else its text."""
    if payload.get("embedded_text"):
        return str(payload["embedded_text"])
    text = str(payload.get("text", ""))
    if payload.get("kind") == "exchange" and text.startswith("User: "):
        return text[len("User: ") :].split("\nAssistant: ", 1)[0]
    return text


def _embed_again(embedder, points: list) -> list[list[float]]:
    """Each point's vector under `embedder`, embedded as it was first: a question
    remembered with its search vector as a query, everything else as a passage."""
    queries = {i for i, p in enumerate(points) if p.payload.get("embedded_as") == "query"}
    vectors = {i: embedder.query(embedded_text(points[i].payload)) for i in queries}
    passages = [i for i in range(len(points)) if i not in queries]
    for start in range(0, len(passages), EMBED_BATCH):
        chunk = passages[start : start + EMBED_BATCH]
        texts = [embedded_text(points[i].payload) for i in chunk]
        vectors.update(zip(chunk, embedder.passages(texts), strict=True))
    return [vectors[i] for i in range(len(points))]


def context_reembed(
    *,
    batch: int,
    project_id: uuid.UUID | None = None,
    agent_id: uuid.UUID | None = None,
    progress: Progress = lambda line: None,
) -> MoveReport:
    """Move agents' context from the shared collections of other embedding models into
    the configured model's, embedding each point's text again. Each page is written to
    the new collection before it is deleted from the old one."""
    store, report = get_vector_store(), MoveReport()
    if store.layout != "shared":
        raise RuntimeError(
            "re-embedding moves context between shared collections (VECTOR_LAYOUT=shared); "
            "a per-agent collection holds one model: migrate to the shared layout first"
        )
    embedder = get_embedder()
    target = shared_collection_name(model=embedder.name, dim=embedder.dim)
    contexts = store.contexts()
    sources = [
        (name, scope)
        for name in store.shared_collections()
        if name != target
        for scope in sorted(contexts.get(name, ()), key=lambda s: s.collection)
        if _wanted(scope, project_id, agent_id)
    ]
    for n, (name, scope) in enumerate(sources, start=1):
        moved = 0
        while True:
            # Always the first page: what is moved is deleted, the rest moves up.
            points, _ = store.scroll(scope, collection=name, limit=batch)
            if not points:
                break
            vectors = _embed_again(embedder, points)
            store.upsert(
                scope,
                [type(p)(p.id, v, p.payload) for p, v in zip(points, vectors, strict=True)],
                model=embedder.name,
                dim=embedder.dim,
            )
            ids = [p.id for p in points]
            if missing := _missing(scope, ids, collection=target, batch=batch):
                raise RuntimeError(f"{len(missing)} points of {scope.collection} not written")
            store.delete_points(scope, ids, collection=name)
            moved += len(points)
        report.agents += 1
        report.points += moved
        progress(f"[{n}/{len(sources)}] {scope.collection}: {moved} points {name} -> {target}")
    return report
