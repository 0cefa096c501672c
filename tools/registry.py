"""Tool kinds other apps execute: a kind's executor is registered by the app that owns
what the kind does (chat registers `agent`: a call starts a run of another agent), so
`tools` runs such calls without importing that app.

An executor takes the call's spec, its parsed arguments and the caller's scope, and
returns (ok, content, extra); it raises ToolError for a failure the model is told.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Executor = Callable[..., tuple[bool, str, dict[str, Any]]]

_executors: dict[str, Executor] = {}


def register_tool_kind(kind: str, executor: Executor) -> None:
    """Let `executor` run the calls of tools of `kind` (called from AppConfig.ready)."""
    _executors[kind] = executor


def tool_kind_executor(kind: str) -> Executor | None:
    return _executors.get(kind)
