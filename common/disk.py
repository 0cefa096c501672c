"""Free space on the volumes the deployment writes to (VAR_DIR, the embedded vector
store's folder). A store that runs out of space mid-write can take the process down
(the embedded engines map their files: a full volume is a SIGBUS, not an exception),
so writers check first and refuse with the reason instead."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from django.conf import settings


def _existing(path: str | Path) -> Path:
    """The path, or its nearest ancestor that exists (a folder not created yet)."""
    p = Path(path).resolve()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def disk_free_mb(path: str | Path) -> float:
    stat = os.statvfs(_existing(path))
    return stat.f_bavail * stat.f_frsize / (1024 * 1024)


def disk_space_problem(path: str | Path) -> str | None:
    """Why writing under `path` must not start (less than DISK_MIN_FREE_MB free), or None."""
    free = disk_free_mb(path)
    if free >= settings.DISK_MIN_FREE_MB:
        return None
    return (
        f"the volume holding {path} is full: {free:.1f} MB free, less than "
        f"DISK_MIN_FREE_MB ({settings.DISK_MIN_FREE_MB:g} MB)"
    )


def disk_health() -> dict[str, Any]:
    """Health's `disk`: free space of each volume written to, and which are full."""
    paths = {"VAR_DIR": settings.VAR_DIR}
    if not settings.QDRANT_URL:
        paths["QDRANT_PATH"] = settings.QDRANT_PATH
    volumes, problems = {}, []
    for name, path in paths.items():
        problem = disk_space_problem(path)
        volumes[name] = {"path": str(path), "free_mb": round(disk_free_mb(path), 1)}
        if problem:
            problems.append(f"{name}: {problem}")
    report: dict[str, Any] = {"healthy": not problems, "volumes": volumes}
    if problems:
        report["error"] = "; ".join(problems)
        report["problems"] = problems
    return report
