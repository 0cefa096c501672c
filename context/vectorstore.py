"""Agent context in Qdrant: names, tenant scopes, data classes and the process's store.

Two layouts (settings.VECTOR_LAYOUT):

- ``shared`` (the default): one collection per embedding model, named after the model
  and its dimension (`shared_collection_name`). Every point carries ``user_id``,
  ``project_id`` (the tenant field, indexed with ``is_tenant``), ``agent_id`` and
  ``collection``, the agent's logical name in the original scheme
  (`user_{u}_project_{p}_{agent}_context`), so that name still identifies an agent's
  context. Qdrant recommends this past a few hundred tenants.
- ``per_agent``: one collection per agent under its logical name, for deployments that
  need collection-level isolation. Its points carry the same tenant fields.

Either way, points are reached only through a `TenantScope`: the store has no method
that reads, counts or deletes points without one (see `qdrant_store.VectorStore`).

Only worker processes open the store; web processes never call `get_vector_store`. With
settings.QDRANT_URL any number of workers share a Qdrant server. The embedded engines
(settings.QDRANT_PATH) open in one process at a time: the process holding the owner
lease opens the folder, and every other worker's store sends its calls there
(context.store_owner).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from django.conf import settings

from common.singletons import process_singleton

from .scopes import (  # noqa: F401  (re-exported: the store's API is one module)
    COLLECTION_RE,
    COLLECTION_SUFFIX,
    LAYOUTS,
    SCOPE_FIELDS,
    SHARED_PREFIX,
    SHARED_RE,
    TENANT_FIELD,
    ContextHit,
    ContextPoint,
    TenantScope,
    TenantScopeRequired,
    collection_name,
    model_slug,
    project_collection_prefix,
    require_scope,
    shared_collection_name,
)
from .store_owner import RemoteStore, embedded_store

if TYPE_CHECKING:
    from .qdrant_store import VectorStore


@process_singleton(
    settings=("QDRANT_URL", "QDRANT_API_KEY", "QDRANT_PATH", "VECTOR_LAYOUT"),
    close=lambda store: store.close(),
)
def get_vector_store() -> VectorStore | RemoteStore:
    """This process's vector store (one client per process). Workers only. Embedded: the
    store itself in the process that owns it, a RemoteStore (the same API, served by the
    owner) in every other."""
    if not settings.QDRANT_URL:
        return embedded_store(on_lost=close_vector_store)
    # Here, not at the top: qdrant_client costs ~0.7 s and ~50 MB, and web processes
    # import this module (names, data classes) but never open the store.
    from .qdrant_store import open_store

    return open_store()


def close_vector_store() -> None:
    """Release the store (worker shutdown, tests): local mode frees the folder's lock."""
    get_vector_store.cache_clear()
