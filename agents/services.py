"""Writes of the catalogue: agents, their tools and the project's secrets."""

from __future__ import annotations

from typing import Any

from django.db import transaction
from django.http import Http404

from common.services import model_update, on_commit_robust
from projects.models import Project
from projects.services import project_lock_for_write
from workspaces.services import workspace_agent_sync_on_commit

from .models import Agent, AgentVersion, ProjectSecret, Tool
from .selectors import agent_lock_for_write
from .signals import agent_deleted
from .versions import agent_restore_rollback_unsafe, agent_version_record

AGENT_FIELDS = ("name", "system_prompt", "model", "params", "busy_policy")


@transaction.atomic
def agent_create(
    *,
    project: Project,
    name: str,
    system_prompt: str = "",
    model: str = "",
    params: dict[str, Any] | None = None,
    busy_policy: str = Agent.BusyPolicy.ENQUEUE,
) -> Agent:
    project_lock_for_write(project_id=project.id)
    agent = Agent.objects.create(
        project=project,
        name=name,
        system_prompt=system_prompt,
        model=model,
        params=params or {},
        busy_policy=busy_policy,
    )
    agent_version_record(agent=agent)
    # The workspace's AgentCache follows the committed row.
    workspace_agent_sync_on_commit(project_id=project.id, agent_id=agent.id)
    return agent


@transaction.atomic
def agent_update(*, agent: Agent, data: dict[str, Any]) -> Agent:
    project_lock_for_write(project_id=agent.project_id)
    agent_lock_for_write(agent_id=agent.id)
    agent, changed = model_update(instance=agent, fields=AGENT_FIELDS, data=data)
    if changed:
        agent_version_record(agent=agent)
        workspace_agent_sync_on_commit(project_id=agent.project_id, agent_id=agent.id)
    return agent


@transaction.atomic
def agent_version_rollback(
    *, agent: Agent, version: AgentVersion
) -> tuple[AgentVersion, list[str]]:
    """Make the agent what `version` was, as a new version (history is never rewritten:
    v1, v2, v3 rolled back to v1 gives v4 equal to v1). Returns the new version and the
    tools that could not come back (their target agent was deleted since)."""
    project_lock_for_write(project_id=agent.project_id)
    agent = agent_lock_for_write(agent_id=agent.id)
    skipped = agent_restore_rollback_unsafe(agent=agent, version=version)
    new = agent_version_record(agent=agent, restored_from=version.number, force=True)
    workspace_agent_sync_on_commit(project_id=agent.project_id, agent_id=agent.id)
    return new, skipped


@transaction.atomic
def agent_delete(*, agent: Agent) -> None:
    project = project_lock_for_write(project_id=agent.project_id)
    agent_id = agent.id
    # Held first: writers adding to it (agent_lock_for_write) have committed, and what
    # they added is among what the delete collects.
    if not Agent.objects.select_for_update().filter(id=agent_id).exists():
        raise Http404("No such agent.")  # deleted meanwhile
    Agent.objects.filter(id=agent_id).delete()
    workspace_agent_sync_on_commit(project_id=project.id, agent_id=agent_id)
    # Its context goes too (context.receivers); if this is lost, the collections sweep
    # finds the stray.
    on_commit_robust(
        lambda: agent_deleted.send(
            sender=Agent, user_id=project.owner_id, project_id=project.id, agent_id=agent_id
        ),
        name=f"agent_deleted(agent={agent_id})",
    )


# --- Tools and the project's secrets (tools, chat.calls) -------------------------------------

TOOL_FIELDS = (
    "kind",
    "name",
    "description",
    "parameters",
    "method",
    "url_template",
    "headers",
    "safe_to_repeat",
    "requires_approval",
    "timeout_seconds",
    "target_agent",
)


@transaction.atomic
def tool_create(*, agent: Agent, data: dict[str, Any]) -> Tool:
    """Give the agent a tool (validated by the caller: agents.apis.tools.tool_check)."""
    project_lock_for_write(project_id=agent.project_id)
    agent_lock_for_write(agent_id=agent.id)
    fields = {k: v for k, v in data.items() if k in TOOL_FIELDS}
    if fields.get("timeout_seconds", "") is None:
        del fields["timeout_seconds"]
    # A GET changes nothing, by HTTP's rules: repeatable unless said otherwise.
    fields.setdefault("safe_to_repeat", fields.get("method") == Tool.Method.GET)
    tool = Tool.objects.create(agent=agent, **fields)
    agent_version_record(agent=agent)
    return tool


@transaction.atomic
def tool_update(*, tool: Tool, data: dict[str, Any]) -> Tool:
    project_lock_for_write(project_id=tool.agent.project_id)
    agent_lock_for_write(agent_id=tool.agent_id)  # its delete takes the tool too
    if not Tool.objects.filter(id=tool.id).exists():
        raise Http404("No such tool.")  # deleted meanwhile
    tool, changed = model_update(instance=tool, fields=TOOL_FIELDS, data=data)
    if changed:
        agent_version_record(agent=tool.agent)
    return tool


@transaction.atomic
def tool_delete(*, tool: Tool) -> None:
    project_lock_for_write(project_id=tool.agent.project_id)
    if not Tool.objects.filter(id=tool.id).delete()[0]:
        raise Http404("No such tool.")
    agent_version_record(agent=tool.agent)


@transaction.atomic
def project_secret_set(
    *, project: Project, name: str, value: str, create: bool = False
) -> ProjectSecret:
    """Store (`create`) or replace a secret's value. The value is never logged."""
    project_lock_for_write(project_id=project.id)
    if create:
        return ProjectSecret.objects.create(project=project, name=name, value=value)
    secret = ProjectSecret.objects.select_for_update().filter(project=project, name=name).first()
    if secret is None:
        raise Http404("No such secret.")  # deleted meanwhile
    secret.value = value
    secret.save(update_fields=["value", "updated_at"])
    return secret


@transaction.atomic
def project_secret_delete(*, secret: ProjectSecret) -> None:
    project_lock_for_write(project_id=secret.project_id)
    if not ProjectSecret.objects.filter(id=secret.id).delete()[0]:
        raise Http404("No such secret.")
