"""Agent context's names, tenant scopes and data classes (see context.vectorstore for
the two layouts). No client here: web processes and the store itself import it."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import Any

COLLECTION_SUFFIX = "_context"
SHARED_PREFIX = "context_"
LAYOUTS = ("shared", "per_agent")
# The payload fields every point carries; TENANT_FIELD is indexed with is_tenant=true.
TENANT_FIELD = "project_id"
SCOPE_FIELDS = ("user_id", "project_id", "agent_id", "collection")

COLLECTION_RE = re.compile(r"^user_(\d+)_project_([0-9a-f]{32})_([0-9a-f]{32})_context$")
SHARED_RE = re.compile(r"^context_([a-z0-9][a-z0-9.-]*)_(\d+)$")


def collection_name(
    *, user_id: int | str, project_id: uuid.UUID | str, agent_id: uuid.UUID | str
) -> str:
    """`user_{u}_project_{p}_{agent}_context`, with uuids as hex (safe for Qdrant): the
    agent's own collection (per_agent) or its logical name in the shared one."""
    return (
        f"{project_collection_prefix(user_id=user_id, project_id=project_id)}"
        f"{uuid.UUID(str(agent_id)).hex}{COLLECTION_SUFFIX}"
    )


def project_collection_prefix(*, user_id: int | str, project_id: uuid.UUID | str) -> str:
    """What every collection of one project starts with (and no other project's does)."""
    return f"user_{int(user_id)}_project_{uuid.UUID(str(project_id)).hex}_"


def model_slug(model: str) -> str:
    """An embedding model's name as it appears in a collection name."""
    slug = re.sub(r"[^a-z0-9.]+", "-", model.lower()).strip("-.")
    if not slug:
        raise ValueError(f"the embedding model name {model!r} has nothing to name a collection")
    return slug


def shared_collection_name(*, model: str, dim: int) -> str:
    """The shared collection of one embedding model: `context_{model}_{dim}`. A new
    model (or the same name at another dimension) gets a collection of its own."""
    return f"{SHARED_PREFIX}{model_slug(model)}_{int(dim)}"


class TenantScopeRequired(TypeError):
    """A point operation was asked for without a tenant scope: refused, never widened."""


@dataclass(frozen=True)
class TenantScope:
    """Whose points an operation may see: one project (of one user), or one agent of it.

    Build it with `TenantScope.project(...)` or `TenantScope.agent(...)`; both check the
    ids, so a scope always names a real tenant and never matches every point.
    """

    user_id: int
    project_id: uuid.UUID
    agent_id: uuid.UUID | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.user_id, int) or isinstance(self.user_id, bool):
            raise TenantScopeRequired("a tenant scope needs an integer user id")
        if not isinstance(self.project_id, uuid.UUID):
            raise TenantScopeRequired("a tenant scope needs a project uuid")
        if self.agent_id is not None and not isinstance(self.agent_id, uuid.UUID):
            raise TenantScopeRequired("an agent scope needs an agent uuid")

    @classmethod
    def project(cls, *, user_id: int | str, project_id: uuid.UUID | str) -> TenantScope:
        return cls(user_id=int(user_id), project_id=uuid.UUID(str(project_id)))

    @classmethod
    def agent(
        cls, *, user_id: int | str, project_id: uuid.UUID | str, agent_id: uuid.UUID | str
    ) -> TenantScope:
        return cls(
            user_id=int(user_id),
            project_id=uuid.UUID(str(project_id)),
            agent_id=uuid.UUID(str(agent_id)),
        )

    @classmethod
    def of_collection(cls, name: str) -> TenantScope | None:
        """The agent scope a logical collection name stands for, or None."""
        match = COLLECTION_RE.match(name)
        if match is None:
            return None
        return cls.agent(user_id=match[1], project_id=match[2], agent_id=match[3])

    @property
    def is_agent(self) -> bool:
        return self.agent_id is not None

    @property
    def collection(self) -> str:
        """The agent's logical collection name (agent scopes only)."""
        if self.agent_id is None:
            raise TenantScopeRequired("only an agent scope has a collection name")
        return collection_name(
            user_id=self.user_id, project_id=self.project_id, agent_id=self.agent_id
        )

    @property
    def prefix(self) -> str:
        return project_collection_prefix(user_id=self.user_id, project_id=self.project_id)

    def conditions(self) -> dict[str, Any]:
        """Payload field -> value every point of the scope has (and no other point has)."""
        must: dict[str, Any] = {"user_id": self.user_id, TENANT_FIELD: self.project_id.hex}
        if self.agent_id is not None:
            must["agent_id"] = self.agent_id.hex
        return must

    def payload(self) -> dict[str, Any]:
        """The tenant fields a point of this (agent) scope carries."""
        return {**self.conditions(), "collection": self.collection}


def require_scope(scope: Any, *, agent: bool = False) -> TenantScope:
    """`scope` if it is a tenant scope (an agent's, when `agent`), else refuse the call."""
    if not isinstance(scope, TenantScope):
        raise TenantScopeRequired(
            f"point operations need a TenantScope, got {type(scope).__name__}: "
            "no query, count or delete runs across tenants"
        )
    if agent and not scope.is_agent:
        raise TenantScopeRequired("this operation needs an agent's scope")
    return scope


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
