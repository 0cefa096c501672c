"""Memory blocks: an agent's core memory, named blocks always in its system prompt.

The owner creates, changes and deletes blocks (API, admin); the agent edits their values
with the builtin tools `memory_append` and `memory_replace`, within each block's limit.
Every change is a `MemoryChange` row (the audit trail, written in the change's
transaction) and, after commit, the `memory_updated` signal (a run in progress tells
its chat stream: chat.toolloop's `memory.updated` event).
"""

from __future__ import annotations

import uuid
from typing import Any

from django.conf import settings
from django.db import transaction
from django.dispatch import Signal

from projects.services import project_lock_for_write

from .models import Agent, MemoryBlock, MemoryChange
from .selectors import agent_lock_for_write
from .versions import agent_version_record, version_section_register

# Sent after commit: agent_id, label, action, actor, run_id.
memory_updated = Signal()

MEMORY_FIELDS = ("label", "value", "limit", "description")
# What an agent version holds of each block: its definition. The value is what the agent
# (or the owner) wrote into it, memory rather than definition: it is not versioned, and a
# rollback keeps the values of the blocks it keeps.
MEMORY_DEFINITION_FIELDS = ("label", "limit", "description")


class MemoryEditRefused(ValueError):
    """An agent's edit that breaks a block's rules (no such block, over its limit, the
    text to replace not found): the tool call's error, nothing written."""


def memory_blocks_prompt(*, agent_id: uuid.UUID | str) -> str:
    """The agent's blocks as its system prompt carries them (verbatim values)."""
    blocks = list(MemoryBlock.objects.filter(agent_id=agent_id).order_by("created_at", "label"))
    if not blocks:
        return ""
    parts = [
        "<memory_blocks>\nYour core memory: these blocks are always here. Edit them with "
        "memory_append and memory_replace (each block has a limit of characters)."
    ]
    for block in blocks:
        parts.append(
            f'<{block.label} chars="{len(block.value)}/{block.limit}">\n'
            f"<description>{block.description}</description>\n"
            f"<value>\n{block.value}\n</value>\n</{block.label}>"
        )
    parts.append("</memory_blocks>")
    return "\n".join(parts)


def _changed(
    *, block_agent_id, label: str, action: str, actor: str, run_id, before: str, after: str
) -> None:
    MemoryChange.objects.create(
        agent_id=block_agent_id,
        label=label,
        action=action,
        actor=actor,
        run_id=run_id or None,
        before=before,
        after=after,
    )
    transaction.on_commit(
        lambda: memory_updated.send(
            sender=MemoryBlock,
            agent_id=str(block_agent_id),
            label=label,
            action=action,
            actor=actor,
            run_id=str(run_id) if run_id else None,
        )
    )


@transaction.atomic
def memory_block_create(*, agent: Agent, data: dict[str, Any], actor: str = "owner") -> MemoryBlock:
    project_lock_for_write(project_id=agent.project_id)
    agent_lock_for_write(agent_id=agent.id)
    block = MemoryBlock.objects.create(
        agent=agent, **{k: v for k, v in data.items() if k in MEMORY_FIELDS}
    )
    _changed(block_agent_id=agent.id, label=block.label, action="create", actor=actor,
             run_id=None, before="", after=block.value)  # fmt: skip
    agent_version_record(agent=agent)
    return block


@transaction.atomic
def memory_block_update(
    *, block: MemoryBlock, data: dict[str, Any], actor: str = "owner"
) -> MemoryBlock:
    project_lock_for_write(project_id=block.agent.project_id)
    current = MemoryBlock.objects.select_for_update().filter(id=block.id).first()
    if current is None:
        raise MemoryBlock.DoesNotExist
    before = current.value
    for field in MEMORY_FIELDS:
        if field in data:
            setattr(current, field, data[field])
    current.save()
    _changed(block_agent_id=current.agent_id, label=current.label, action="update",
             actor=actor, run_id=None, before=before, after=current.value)  # fmt: skip
    agent_version_record(agent=current.agent)  # a new one only if its definition changed
    return current


@transaction.atomic
def memory_block_delete(*, block: MemoryBlock, actor: str = "owner") -> None:
    project_lock_for_write(project_id=block.agent.project_id)
    if MemoryBlock.objects.filter(id=block.id).delete()[0]:
        _changed(block_agent_id=block.agent_id, label=block.label, action="delete",
                 actor=actor, run_id=None, before=block.value, after="")  # fmt: skip
        agent_version_record(agent=block.agent)


@transaction.atomic
def memory_edit_by_agent(
    *,
    agent_id: uuid.UUID | str,
    label: str,
    action: str,
    run_id: str = "",
    content: str = "",
    old: str = "",
    new: str = "",
) -> MemoryBlock:
    """The agent's own edit of a block (its tools): `append` adds `content` on a new
    line; `replace` swaps the one occurrence of `old` for `new` (`new` may be empty:
    a deletion). Refused (MemoryEditRefused, nothing written) beyond the block's limit.
    NUL characters are taken out of what the model wrote (PostgreSQL's text refuses
    them)."""
    content, old, new = (text.replace("\x00", "") for text in (content, old, new))
    block = MemoryBlock.objects.select_for_update().filter(agent_id=agent_id, label=label).first()
    if block is None:
        labels = list(MemoryBlock.objects.filter(agent_id=agent_id).values_list("label", flat=True))
        raise MemoryEditRefused(f"no memory block {label!r}; blocks: {', '.join(labels) or 'none'}")
    before = block.value
    if action == "append":
        if not content:
            raise MemoryEditRefused("content is empty")
        after = f"{before}\n{content}" if before else content
    elif action == "replace":
        if not old:
            raise MemoryEditRefused("old_content is empty")
        found = before.count(old)
        if found != 1:
            raise MemoryEditRefused(
                f"old_content occurs {found} times in {label!r}; it must occur exactly once"
            )
        after = before.replace(old, new)
    else:
        raise MemoryEditRefused(f"unknown memory action {action!r}")
    if len(after) > block.limit:
        raise MemoryEditRefused(
            f"{label!r} would hold {len(after)} characters; its limit is {block.limit}. "
            "Replace or shorten something first."
        )
    block.value = after
    block.save(update_fields=["value", "updated_at"])
    _changed(block_agent_id=block.agent_id, label=label, action=action, actor="agent",
             run_id=run_id, before=before, after=after)  # fmt: skip
    return block


def memory_limits() -> tuple[int, int]:
    return settings.MEMORY_BLOCKS_PER_AGENT, settings.MEMORY_BLOCK_MAX_CHARS


# --- Memory block definitions as a section of agent versions ---------------------------


def memory_definitions(agent: Agent) -> list[dict[str, Any]]:
    """The agent's blocks as a version holds them (definitions, by label)."""
    blocks = MemoryBlock.objects.filter(agent_id=agent.id).order_by("label")
    return [{field: getattr(b, field) for field in MEMORY_DEFINITION_FIELDS} for b in blocks]


def memory_definitions_restore_unsafe(agent: Agent, data: list[dict[str, Any]]) -> None:
    """Make the agent's blocks those of a version (inside a rollback's transaction):
    blocks it lacks go, blocks it has come back (empty, if they were gone), limits and
    descriptions are the version's; each change is in the audit trail."""
    wanted = {block["label"]: block for block in data or []}
    for block in MemoryBlock.objects.select_for_update().filter(agent_id=agent.id):
        want = wanted.pop(block.label, None)
        if want is None:
            block.delete()
            _changed(block_agent_id=agent.id, label=block.label, action="delete",
                     actor="owner", run_id=None, before=block.value, after="")  # fmt: skip
        elif (block.limit, block.description) != (want["limit"], want["description"]):
            block.limit, block.description = want["limit"], want["description"]
            block.save(update_fields=["limit", "description", "updated_at"])
            _changed(block_agent_id=agent.id, label=block.label, action="update",
                     actor="owner", run_id=None, before=block.value, after=block.value)  # fmt: skip
    for label, want in wanted.items():
        MemoryBlock.objects.create(agent=agent, label=label, limit=want["limit"],
                                   description=want["description"])  # fmt: skip
        _changed(block_agent_id=agent.id, label=label, action="create", actor="owner",
                 run_id=None, before="", after="")  # fmt: skip


version_section_register(
    "memory_blocks", snapshot=memory_definitions, restore=memory_definitions_restore_unsafe
)
