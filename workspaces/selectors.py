"""Reads of workspaces for operators: the registry with its bus view, stats and health."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from django.db import connection

from agentbus import live_workers, queue_depths
from common.redis import broker_redis, get_redis
from projects.models import Project

from . import registry
from .manager import get_worker_space_manager
from .registry import RegistryEntry, State
from .sources import health_checks
from .space import iso


@dataclass
class WorkspaceView:
    """A registry entry with what the bus and the database say about it."""

    entry: RegistryEntry
    queue_depth: int = 0
    project_exists: bool = True
    project_name: str = ""
    read_errors: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        return self.entry.key

    @property
    def problems(self) -> list[str]:
        """Why the workspace is unhealthy; empty if it is healthy."""
        e = self.entry
        found = list(self.read_errors)
        if not self.project_exists:
            found.append("no project row: a teardown is owed")
        if e.state is State.ERROR:
            found.append(f"initialisation failed: {e.error}")
        stuck_after = settings.WORKSPACE_INIT_LOCK_SECONDS
        if e.state is State.INITIALIZING and time.time() - (e.changed_at or 0) > stuck_after:
            found.append("initialisation has not finished")
        return found

    def stats(self) -> dict[str, Any]:
        e = self.entry
        return {
            "user_id": e.user_id,
            "project_id": str(e.project_id),
            "project_name": self.project_name,
            "state": str(e.state),
            "initialized": e.state is State.INITIALIZED,
            "active_agents": len(e.agent_ids),
            "cache_size": len(e.agent_ids),
            "agent_ids": e.agent_ids,
            "initialization_time": iso(e.initialized_at),
            "last_used": iso(e.last_used),
            "init_count": e.init_count,
            "queue_depth": self.queue_depth,
            "error": e.error or None,
        }


def workspace_list(*, offset: int = 0, limit: int | None = None) -> tuple[list[WorkspaceView], int]:
    """A page of the registry (sorted by user, project) with bus and database views,
    and the registry's size."""
    members = registry.index_members()
    page = members[offset : offset + limit if limit is not None else None]
    return _views(page), len(members)


def workspace_get(*, user_id: int, project_id: uuid.UUID) -> WorkspaceView | None:
    """One workspace's view, or None if the registry does not know it."""
    (view,) = _views([(int(user_id), project_id)])
    return view if view.entry.exists else None


def _views(members: list[tuple[int, uuid.UUID]]) -> list[WorkspaceView]:
    """Views of these workspaces in a few round trips, whatever their number."""
    if not members:
        return []
    entries = registry.read_many(members)
    depths = queue_depths([project_id for _, project_id in members])
    rows = Project.objects.filter(id__in=[p for _, p in members]).values_list(
        "id", "owner_id", "name"
    )
    projects = {pid: (owner, name) for pid, owner, name in rows}
    views = []
    for entry, depth in zip(entries, depths, strict=True):
        owner, name = projects.get(entry.project_id, (None, ""))
        unreadable = isinstance(depth, Exception)
        views.append(
            WorkspaceView(
                entry=entry,
                queue_depth=0 if unreadable else depth,
                read_errors=[f"bus state unreadable: {depth}"] if unreadable else [],
                project_exists=owner == entry.user_id,
                project_name=name if owner == entry.user_id else "",
            )
        )
    return views


def workspace_stats(*, offset: int = 0, limit: int | None = None) -> dict[str, Any]:
    """Every workspace of the registry (all processes), in the stats shape, plus
    this process's in-memory view."""
    views, total = workspace_list(offset=offset, limit=limit)
    process = get_worker_space_manager().get_stats()["process"]
    return {
        "active_spaces": sum(1 for v in views if v.entry.state is State.INITIALIZED),
        "total_spaces": total,
        "offset": offset,
        "limit": limit,
        "spaces": {v.key: v.stats() for v in views},
        "process": process,
        **{name: _run_check(check) for name, check in health_checks().items()},
    }


def workspace_health() -> dict[str, Any]:
    """The health report of every workspace of the registry, plus the checks of
    what workspaces stand on: database, Redis, broker and live workers."""
    checks = {
        "database": _check(_ping_database),
        "redis": _check(lambda: get_redis().ping()),
        "broker": _check(_ping_broker),
        "workers": _check_workers(),
        **{name: _run_check(check) for name, check in health_checks().items()},
    }
    details: dict[str, Any] = {}
    unhealthy: list[str] = []
    if checks["redis"]["healthy"] and checks["database"]["healthy"]:
        try:
            views, _ = workspace_list()
        except Exception as exc:  # noqa: BLE001  (reported, not raised: this is the health check)
            checks["registry"] = {"healthy": False, "error": f"{type(exc).__name__}: {exc}"}
            views = []
        for view in views:
            problems = view.problems
            details[view.key] = {
                "healthy": not problems,
                "agents": len(view.entry.agent_ids),
                "initialized": view.entry.state is State.INITIALIZED,
                "state": str(view.entry.state),
                "queue_depth": view.queue_depth,
                "problems": problems,
            }
            if problems:
                unhealthy.append(view.key)
    return {
        "healthy": all(c["healthy"] for c in checks.values()) and not unhealthy,
        "total_spaces": len(details),
        "healthy_spaces": len(details) - len(unhealthy),
        "unhealthy_spaces": unhealthy,
        "details": details,
        "checks": checks,
    }


def _check(probe) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        probe()
    except Exception as exc:  # noqa: BLE001
        return {"healthy": False, "error": f"{type(exc).__name__}: {exc}"}
    return {"healthy": True, "latency_ms": round((time.perf_counter() - started) * 1000, 2)}


def _run_check(check) -> dict[str, Any]:
    try:
        return check()
    except Exception as exc:  # noqa: BLE001  (reported, not raised: this is the health check)
        return {"healthy": False, "error": f"{type(exc).__name__}: {exc}"}


def _ping_database() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")


def _ping_broker() -> None:
    broker_redis().ping()


def _check_workers() -> dict[str, Any]:
    """Live workers from their heartbeats (no broadcast ping waiting for replies)."""
    started = time.perf_counter()
    try:
        workers = live_workers()
    except Exception as exc:  # noqa: BLE001
        return {"healthy": False, "count": 0, "error": f"{type(exc).__name__}: {exc}"}
    names = sorted(w["name"] for w in workers)
    result: dict[str, Any] = {
        "healthy": bool(names),
        "count": len(names),
        "names": names,
        "workers": workers,
        "latency_ms": round((time.perf_counter() - started) * 1000, 2),
    }
    if not names:
        result["error"] = "no worker reported itself alive recently"
    return result
