"""Agent versions: every change to what an agent is (prompt, model, parameters, busy
policy, tools, and the sections other apps register) records an immutable snapshot.

`agent_version_record` is called at the end of every write that may change the
definition, inside its transaction (the project row is locked, so two writes to one
agent number their versions one after the other). It compares the new snapshot with
the latest version's and records one only when something differs.

Sections: an app that adds to an agent's definition (memory block definitions, wt-28)
registers a section once, e.g. in its AppConfig.ready:

    version_section_register(
        "memory_blocks",
        snapshot=lambda agent: [...],          # JSON of the agent's blocks now
        restore=lambda agent, data: ...,       # make the agent's blocks equal `data`
    )

and calls `agent_version_record(agent=...)` at the end of its own writes. The section
is then part of every version, of `agent_version_diff` and of a rollback.
"""

from __future__ import annotations

import difflib
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .models import Agent, AgentVersion, Tool

DEFINITION_FIELDS = ("system_prompt", "model", "params", "busy_policy")
TOOL_SNAPSHOT_FIELDS = (
    "kind",
    "name",
    "description",
    "parameters",
    "method",
    "url_template",
    "headers",
    "safe_to_repeat",
    "timeout_seconds",
)


@dataclass(frozen=True)
class VersionSection:
    name: str
    snapshot: Callable[[Agent], Any]
    restore: Callable[[Agent, Any], None]


_SECTIONS: dict[str, VersionSection] = {}


def version_section_register(
    name: str, *, snapshot: Callable[[Agent], Any], restore: Callable[[Agent, Any], None]
) -> None:
    """Make `name` part of every agent version from now on (idempotent per name)."""
    _SECTIONS[name] = VersionSection(name=name, snapshot=snapshot, restore=restore)


def version_sections() -> dict[str, VersionSection]:
    return dict(_SECTIONS)


def tool_snapshot(tool: Tool) -> dict[str, Any]:
    data = {field: getattr(tool, field) for field in TOOL_SNAPSHOT_FIELDS}
    data["target_agent_id"] = str(tool.target_agent_id) if tool.target_agent_id else None
    return data


def agent_snapshot(agent: Agent) -> dict[str, Any]:
    """What a version of `agent` holds, as JSON values."""
    tools = Tool.objects.filter(agent_id=agent.id).order_by("name")
    return {
        **{field: getattr(agent, field) for field in DEFINITION_FIELDS},
        "tools": [tool_snapshot(tool) for tool in tools],
        "sections": {name: s.snapshot(agent) for name, s in sorted(_SECTIONS.items())},
    }


def version_snapshot(version: AgentVersion) -> dict[str, Any]:
    return {
        **{field: getattr(version, field) for field in DEFINITION_FIELDS},
        "tools": list(version.tools),
        "sections": dict(version.sections),
    }


def agent_version_latest(*, agent_id: uuid.UUID | str) -> AgentVersion | None:
    return AgentVersion.objects.filter(agent_id=agent_id).order_by("-number").first()


def agent_version_record(
    *, agent: Agent, restored_from: int | None = None, force: bool = False
) -> AgentVersion | None:
    """Record the agent's definition as a new version if it differs from the latest
    (or `force`). Call inside the writing transaction, with the project row locked
    (projects.services.project_lock_for_write). Returns the new version or None."""
    snapshot = agent_snapshot(agent)
    latest = (
        AgentVersion.objects.select_for_update()
        .filter(agent_id=agent.id)
        .order_by("-number")
        .first()
    )
    if latest is not None and not force and version_snapshot(latest) == snapshot:
        return None
    return AgentVersion.objects.create(
        agent_id=agent.id,
        number=(latest.number if latest else 0) + 1,
        name=agent.name,
        restored_from=restored_from,
        **snapshot,
    )


def _changed(old: Any, new: Any) -> dict[str, Any]:
    return {"from": old, "to": new}


def agent_version_diff(old: AgentVersion, new: AgentVersion) -> dict[str, Any]:
    """What changed from `old` to `new`: each changed field (from, to), the prompt as a
    unified diff, tools added, removed and changed (by name), sections changed."""
    a, b = version_snapshot(old), version_snapshot(new)
    fields = {f: _changed(a[f], b[f]) for f in DEFINITION_FIELDS if a[f] != b[f]}
    prompt_diff = "".join(
        difflib.unified_diff(
            a["system_prompt"].splitlines(keepends=True),
            b["system_prompt"].splitlines(keepends=True),
            fromfile=f"v{old.number}",
            tofile=f"v{new.number}",
        )
    )
    old_tools = {t["name"]: t for t in a["tools"]}
    new_tools = {t["name"]: t for t in b["tools"]}
    tools_changed = {}
    for name in sorted(old_tools.keys() & new_tools.keys()):
        before, after = old_tools[name], new_tools[name]
        delta = {
            k: _changed(before.get(k), after.get(k)) for k in after if before.get(k) != after[k]
        }
        if delta:
            tools_changed[name] = delta
    sections = {
        name: _changed(a["sections"].get(name), b["sections"].get(name))
        for name in sorted(a["sections"].keys() | b["sections"].keys())
        if a["sections"].get(name) != b["sections"].get(name)
    }
    return {
        "from_version": old.number,
        "to_version": new.number,
        "fields": fields,
        "system_prompt_diff": prompt_diff,
        "tools_added": sorted(new_tools.keys() - old_tools.keys()),
        "tools_removed": sorted(old_tools.keys() - new_tools.keys()),
        "tools_changed": tools_changed,
        "sections": sections,
    }


def version_tool_rows(version: AgentVersion) -> list[Tool]:
    """The version's tools as unsaved rows (what a run of a pinned version calls); the
    id is made from the version and the name, so MCP listings cache per version."""
    rows = []
    for data in version.tools:
        fields = {k: data.get(k) for k in TOOL_SNAPSHOT_FIELDS if k in data}
        rows.append(
            Tool(
                id=uuid.uuid5(version.id, data["name"]),
                agent_id=version.agent_id,
                target_agent_id=data.get("target_agent_id"),
                created_at=version.created_at,
                updated_at=version.created_at,
                **fields,
            )
        )
    return rows


def agent_restore_rollback_unsafe(*, agent: Agent, version: AgentVersion) -> list[str]:
    """Make the agent's definition equal to `version` (fields, tools by name, sections).
    Unsafe outside the service's transaction with the project locked. Returns the names
    of tools that could not be restored (their target agent is gone)."""
    for field in DEFINITION_FIELDS:
        setattr(agent, field, getattr(version, field))
    agent.save(update_fields=[*DEFINITION_FIELDS, "updated_at"])
    wanted = {t["name"]: t for t in version.tools}
    Tool.objects.filter(agent_id=agent.id).exclude(name__in=list(wanted)).delete()
    existing = {t.name: t for t in Tool.objects.filter(agent_id=agent.id)}
    live_agents = {
        str(i)
        for i in Agent.objects.filter(project_id=agent.project_id).values_list("id", flat=True)
    }
    skipped = []
    for name, data in wanted.items():
        target = data.get("target_agent_id")
        if target and target not in live_agents:
            skipped.append(name)
            Tool.objects.filter(agent_id=agent.id, name=name).delete()
            continue
        fields = {k: data[k] for k in TOOL_SNAPSHOT_FIELDS if k in data}
        fields["target_agent_id"] = target
        tool = existing.get(name)
        if tool is None:
            Tool.objects.create(agent=agent, **fields)
        else:
            for key, value in fields.items():
                setattr(tool, key, value)
            tool.save()
    for name, section in _SECTIONS.items():
        if name in version.sections:
            section.restore(agent, version.sections[name])
    return skipped
