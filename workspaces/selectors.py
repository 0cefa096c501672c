"""Reads of workspaces for operators: the registry with its bus view, stats and health."""

from __future__ import annotations

import bisect
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import connection
from django.db.models import Count, Q
from django.http import Http404
from django.utils import timezone

from agentbus import broker_health, live_workers, queue_depths
from agentbus.flow import flow_control_on, flow_status
from common.disk import disk_health
from common.redis import get_redis, redis_health
from projects.models import Project

from . import registry
from .manager import get_worker_space_manager
from .models import WorkspaceTeardown
from .registry import RegistryEntry, State
from .sources import health_check_breaks_everyone, health_checks, project_health_checks
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


def workspace_list(*, offset: int = 0, limit: int = 100) -> tuple[list[WorkspaceView], int]:
    """A page of the registry (sorted by user, project) with bus and database views,
    and the registry's size: a few round trips for the page, whatever the registry's
    size."""
    return _views(registry.index_page(offset=offset, limit=limit)), registry.index_size()


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


def workspace_stats(*, offset: int = 0, limit: int = 100) -> dict[str, Any]:
    """A page of the registry's workspaces (all processes) in the stats shape, the
    counts by state of all of them, and this process's in-memory view."""
    total, states = registry.state_counts()
    views = _views(registry.index_page(offset=offset, limit=limit))
    process = get_worker_space_manager().get_stats()["process"]
    return {
        "active_spaces": states[State.INITIALIZED],
        "total_spaces": total,
        "states": states,
        "offset": offset,
        "limit": limit,
        "spaces": {v.key: v.stats() for v in views},
        "process": process,
        **{name: _run_check(check) for name, check in health_checks().items()},
    }


# What every tenant stands on: if one of these fails, no project can be served, and only
# then does the deployment's health answer 503 (a load balancer takes the node out).
DEPLOYMENT_CHECKS = ("database", "redis", "broker", "workers", "registry")


def workspace_health(*, offset: int = 0, limit: int = 50) -> dict[str, Any]:
    """The health report: the checks of what workspaces stand on (database, Redis,
    broker, live workers from their heartbeats), the registry summarised (counts by
    state, the problems counted) and a page of workspaces, those with problems first.

    `healthy` is false only when something every tenant needs fails (DEPLOYMENT_CHECKS
    and checks registered as breaking everyone). One project's problems (a failed
    initialisation, failed or stuck runs) make the report `degraded` and are named in
    `unhealthy_projects`; they never take the other tenants offline.

    Its cost follows the page and the problems, not the number of workspaces: counts
    come from the per-state sets, and only the page is read in detail.
    """
    checks = {
        "database": _check(_ping_database),
        "redis": _run_check(lambda: redis_health(get_redis())),
        "broker": _run_check(broker_health),
        "workers": _check_workers(),
        "disk": _run_check(disk_health),
        **{name: _run_check(check) for name, check in health_checks().items()},
    }
    report: dict[str, Any] = {"total_spaces": 0, "healthy_spaces": 0, "states": {}}
    problems: dict[str, int] = {}
    details: dict[str, Any] = {}
    unhealthy: list[str] = []
    named: dict[str, dict[str, Any]] = {}
    if checks["redis"]["healthy"] and checks["database"]["healthy"]:
        try:
            summary = _registry_summary()
            page = _problems_first_page(summary.pop("problem_members"), offset, limit)
            views = _views(page)
        except Exception as exc:  # noqa: BLE001  (reported, not raised: this is the health check)
            checks["registry"] = {"healthy": False, "error": f"{type(exc).__name__}: {exc}"}
        else:
            problems = summary.pop("problems")
            report.update(summary)
            for view in views:
                found = view.problems
                details[view.key] = {
                    "healthy": not found,
                    "agents": len(view.entry.agent_ids),
                    "initialized": view.entry.state is State.INITIALIZED,
                    "state": str(view.entry.state),
                    "queue_depth": view.queue_depth,
                    "problems": found,
                }
                if found:
                    unhealthy.append(view.key)
                    _name_project(
                        named,
                        project_id=str(view.entry.project_id),
                        user_id=view.entry.user_id,
                        project_name=view.project_name,
                        problems=found,
                    )
    for name, check in checks.items():
        for project in check.get("projects") or ():
            _name_project(
                named, **{**project, "problems": [f"{name}: {p}" for p in project["problems"]]}
            )
    failing = {k: n for k, n in problems.items() if k in UNHEALTHY_PROBLEMS and n}
    broken = [
        name
        for name, check in checks.items()
        if not check["healthy"]
        and (name in DEPLOYMENT_CHECKS or health_check_breaks_everyone(name))
    ]
    # Failing for some projects only, or working with a warning (a Redis that may evict).
    degraded = [
        name
        for name, check in checks.items()
        if name not in broken and (not check["healthy"] or check.get("warning"))
    ] + list(failing)
    return {
        "healthy": not broken,
        "degraded": degraded,
        **report,
        "problems": problems,
        "unhealthy_spaces": unhealthy,
        "unhealthy_projects": list(named.values()),
        "offset": offset,
        "limit": limit,
        "details": details,
        "checks": checks,
    }


def _name_project(
    named: dict[str, dict[str, Any]],
    *,
    project_id: str,
    user_id: int | None,
    project_name: str,
    problems: list[str],
) -> None:
    """Add a project's problems to the report's list of projects, one entry each."""
    entry = named.setdefault(
        project_id,
        {
            "project_id": project_id,
            "user_id": user_id,
            "project_name": project_name,
            "problems": [],
        },
    )
    entry["project_name"] = entry["project_name"] or project_name
    entry["problems"].extend(problems)


def project_health(*, project_id: uuid.UUID) -> dict[str, Any]:
    """One project's health: what it stands on (database, Redis, live workers), its
    workspace as the registry and the bus see it, and the project checks (its runs).
    `healthy` is false when anything this project needs fails. Http404 for a project
    that does not exist (operators see every project)."""
    project = Project.objects.filter(id=project_id).first()
    if project is None:
        raise Http404("No such project.")
    checks = {
        "database": _check(_ping_database),
        "redis": _run_check(lambda: redis_health(get_redis())),
        "workers": _check_workers(),
    }
    workspace: dict[str, Any] | None = None
    if checks["redis"]["healthy"]:
        try:
            view = workspace_get(user_id=project.owner_id, project_id=project.id)
        except Exception as exc:  # noqa: BLE001  (reported, not raised: this is the health check)
            checks["workspace"] = {"healthy": False, "error": f"{type(exc).__name__}: {exc}"}
        else:
            found = view.problems if view else []
            workspace = (
                None
                if view is None
                else {
                    "state": str(view.entry.state),
                    "initialized": view.entry.state is State.INITIALIZED,
                    "agents": len(view.entry.agent_ids),
                    "queue_depth": view.queue_depth,
                }
            )
            checks["workspace"] = {"healthy": not found, "problems": found}
    for name, check in project_health_checks().items():
        checks[name] = _run_check(lambda check=check: check(project.id))
    problems = [
        f"{name}: {problem}"
        for name, check in checks.items()
        if not check["healthy"]
        for problem in (check.get("problems") or [check.get("error", "unhealthy")])
    ]
    return {
        "healthy": not problems,
        "project_id": str(project.id),
        "project_name": project.name,
        "user_id": project.owner_id,
        "problems": problems,
        "workspace": workspace,
        "checks": checks,
    }


# Problems that make the report unhealthy; the others are reported for information.
UNHEALTHY_PROBLEMS = ("initialisation_failed", "initialisation_stuck", "teardowns_overdue")


def _registry_summary() -> dict[str, Any]:
    """Counts by state and of problems, and the workspaces with problems (failed, then
    stuck initialisations, oldest first)."""
    total, states = registry.state_counts()
    stuck_before = time.time() - settings.WORKSPACE_INIT_LOCK_SECONDS
    failed = registry.state_members(State.ERROR)
    stuck = registry.state_members(State.INITIALIZING, entered_before=stuck_before)
    overdue_before = timezone.now() - timedelta(
        seconds=settings.WORKSPACE_TEARDOWN_REDISPATCH_SECONDS
    )
    pending = WorkspaceTeardown.objects.filter(status=WorkspaceTeardown.Status.PENDING)
    counts = pending.aggregate(
        pending=Count("id"), overdue=Count("id", filter=Q(created_at__lt=overdue_before))
    )
    return {
        "total_spaces": total,
        "healthy_spaces": total - len(failed) - len(stuck),
        "states": states,
        "problems": {
            "initialisation_failed": len(failed),
            "initialisation_stuck": len(stuck),
            "teardowns_pending": counts["pending"],
            "teardowns_overdue": counts["overdue"],
            "orphans_suspected": int(get_redis().hlen(registry.SUSPECTS_KEY)),
        },
        "problem_members": failed + stuck,
    }


def _problems_first_page(
    problems: list[tuple[int, uuid.UUID]], offset: int, limit: int
) -> list[tuple[int, uuid.UUID]]:
    """Page [offset, offset + limit) of: the problem workspaces, then every other one in
    index order. Reads the problems' ranks and one slice of the index."""
    page = problems[offset : offset + limit]
    wanted = limit - len(page)
    if wanted <= 0:
        return page
    # The page goes on with the rest_start-th workspace that has no problem. That one's
    # rank is rest_start plus the problems ranked before it: at least rest_start, and at
    # most rest_start + the number of problems.
    rest_start = max(0, offset - len(problems))
    skip = set(problems)
    ranks = sorted(r for r in registry.index_ranks(problems) if r is not None)
    candidates = registry.index_page(offset=rest_start, limit=wanted + len(ranks))
    for rank, member in enumerate(candidates, start=rest_start):
        if member in skip:
            continue
        if rank - bisect.bisect_left(ranks, rank) >= rest_start:
            page.append(member)
            if len(page) == limit:
                break
    return page


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


class DatabaseReadOnly(Exception):
    """The database answers but refuses every change."""


def _ping_database() -> None:
    """The database answers and, on PostgreSQL, takes writes: a standby, or a server its
    operator or host made read-only (as some hosts do when its disk fills), answers a
    SELECT but refuses every change."""
    with connection.cursor() as cursor:
        if connection.vendor != "postgresql":
            cursor.execute("SELECT 1")
            return
        cursor.execute("SHOW transaction_read_only")
        if cursor.fetchone()[0] == "on":
            raise DatabaseReadOnly(
                "it refuses writes (transaction_read_only is on: a standby, or a server "
                "made read-only)"
            )


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


def project_flow(*, project_id: uuid.UUID) -> dict[str, Any]:
    """A project's flow rules as stored (database) and as the bus applies them (Redis),
    with its live figures (agentbus.flow); Http404 for no such project."""
    project = Project.objects.filter(id=project_id).first()
    if project is None:
        raise Http404("No such project.")
    status = flow_status([project.id])[str(project.id)]
    return {
        "project_id": project.id,
        "project_name": project.name,
        "weight": project.flow_weight,
        "effective_weight": project.effective_weight,
        "max_in_flight": project.flow_max_in_flight,
        # Stored as saved, and applied by the take (AGENTBUS_FLOW_CONTROL on).
        "applied": flow_control_on()
        and status.weight == project.effective_weight
        and status.max_in_flight == project.flow_max_in_flight,
        "bus": asdict(status),
    }
