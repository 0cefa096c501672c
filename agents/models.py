"""The catalogue: a project's agents, their tools and the project's secrets."""

import uuid

from django.db import models

from common.validators import validate_text_size
from governance.secrets import EncryptedTextField
from projects.models import Project

from .tool_validation import (
    validate_header_templates,
    validate_parameters_schema,
    validate_secret_name,
    validate_tool_name,
    validate_url_template,
)
from .validators import validate_params


class Agent(models.Model):
    """An agent of a project: a system prompt, a model and its parameters."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="agents")
    name = models.CharField(max_length=200)
    system_prompt = models.TextField(blank=True, default="", validators=[validate_text_size])
    model = models.CharField(max_length=200, blank=True, default="")
    params = models.JSONField(default=dict, blank=True, validators=[validate_params])

    class BusyPolicy(models.TextChoices):
        """What a message that arrives while one of the session's runs is active does."""

        REJECT = "reject"  # refused (409); the active run goes on
        ENQUEUE = "enqueue"  # answered after the active run
        INTERRUPT = "interrupt"  # the active run is cancelled; this one is answered

    busy_policy = models.CharField(
        max_length=16, choices=BusyPolicy.choices, default=BusyPolicy.ENQUEUE
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["created_at", "id"]
        constraints = [
            models.UniqueConstraint(fields=["project", "name"], name="agent_name_unique_in_project")
        ]
        indexes = [models.Index(fields=["project", "created_at"], name="agent_project_created")]

    def __str__(self) -> str:
        return self.name


class ProjectSecret(models.Model):
    """A named value of a project that HTTP tools put into their request headers. The
    API accepts it and never returns it; tools' results and events are scrubbed of it.
    Stored encrypted, like provider keys (governance.secrets)."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="secrets")
    name = models.CharField(max_length=64, validators=[validate_secret_name])
    value = EncryptedTextField()
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.UniqueConstraint(
                fields=["project", "name"], name="secret_name_unique_in_project"
            )
        ]

    def __str__(self) -> str:
        return self.name


class Tool(models.Model):
    """A tool an agent may call: a built-in one, or an HTTP endpoint described by a
    method, a URL template, header templates and JSON-schema parameters."""

    class Kind(models.TextChoices):
        BUILTIN = "builtin"
        HTTP = "http"
        # Another agent of the same project, asked over the project's bus.
        AGENT = "agent"
        # The tools of an MCP server (streamable HTTP) at `url_template`.
        MCP = "mcp"

    class Method(models.TextChoices):
        GET = "GET"
        POST = "POST"
        PUT = "PUT"
        PATCH = "PATCH"
        DELETE = "DELETE"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    agent = models.ForeignKey(Agent, on_delete=models.CASCADE, related_name="tools")
    kind = models.CharField(max_length=16, choices=Kind.choices)
    # The function name the model calls; for a built-in tool, which built-in it is.
    name = models.CharField(max_length=64, validators=[validate_tool_name])
    description = models.TextField(blank=True, default="", validators=[validate_text_size])
    parameters = models.JSONField(default=dict, blank=True, validators=[validate_parameters_schema])
    method = models.CharField(max_length=8, choices=Method.choices, blank=True, default="")
    url_template = models.CharField(
        max_length=2000, blank=True, default="", validators=[validate_url_template]
    )
    # {"Header-Name": "text with {{secret:NAME}}"}: values are filled from the
    # project's secrets when the tool is called.
    headers = models.JSONField(default=dict, blank=True, validators=[validate_header_templates])
    # May a call run again after a worker died during it? (GET is, by HTTP's own rules.)
    safe_to_repeat = models.BooleanField(default=False)
    # A call waits for its owner's approval (chat: the run is stored, holding no worker,
    # until approved, edited or rejected). TOOL_APPROVAL_KINDS makes whole kinds wait.
    requires_approval = models.BooleanField(default=False)
    timeout_seconds = models.FloatField(null=True, blank=True)
    # Agent tools: the agent of the same project this tool asks.
    target_agent = models.ForeignKey(
        Agent, on_delete=models.CASCADE, null=True, blank=True, related_name="called_by"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["created_at", "id"]
        constraints = [
            models.UniqueConstraint(fields=["agent", "name"], name="tool_name_unique_in_agent")
        ]

    def __str__(self) -> str:
        return self.name


class MemoryBlock(models.Model):
    """A named block of an agent's core memory (Letta's persona / human blocks): always
    in its system prompt, edited by the owner (API, admin) and by the agent itself
    (builtin tools memory_append, memory_replace), never beyond `limit` characters."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    agent = models.ForeignKey(Agent, on_delete=models.CASCADE, related_name="memory_blocks")
    label = models.CharField(max_length=64)
    value = models.TextField(blank=True, default="")
    limit = models.PositiveIntegerField(default=2000)
    description = models.TextField(blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["created_at", "label"]
        constraints = [
            models.UniqueConstraint(fields=["agent", "label"], name="memory_label_unique_in_agent")
        ]

    def __str__(self) -> str:
        return f"{self.agent_id}:{self.label}"


class MemoryChange(models.Model):
    """The audit trail of memory blocks: every change, by whom (the owner through the
    API, an admin, or the agent in a run), with the value before and after."""

    class Actor(models.TextChoices):
        OWNER = "owner"
        ADMIN = "admin"
        AGENT = "agent"

    id = models.BigAutoField(primary_key=True)
    agent = models.ForeignKey(Agent, on_delete=models.CASCADE, related_name="memory_changes")
    label = models.CharField(max_length=64)
    action = models.CharField(max_length=16)  # create, update, delete, append, replace
    actor = models.CharField(max_length=8, choices=Actor.choices)
    run_id = models.UUIDField(null=True, blank=True)
    before = models.TextField(blank=True, default="")
    after = models.TextField(blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["agent", "-created_at"], name="memory_change_agent")]

    def __str__(self) -> str:
        return f"{self.label} {self.action} by {self.actor}"


class AgentVersion(models.Model):
    """One immutable snapshot of an agent's definition: its prompt, model, parameters,
    busy policy, tools and the sections other apps register (agents.versions). Made by
    every change that alters the definition; never changed afterwards (no service
    updates one, the admin shows them read-only). A session may pin one; a run records
    the one it used."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    agent = models.ForeignKey(Agent, on_delete=models.CASCADE, related_name="versions")
    # 1, 2, 3… per agent.
    number = models.PositiveIntegerField()
    name = models.CharField(max_length=200)
    system_prompt = models.TextField(blank=True, default="")
    model = models.CharField(max_length=200, blank=True, default="")
    params = models.JSONField(default=dict, blank=True)
    busy_policy = models.CharField(max_length=16, blank=True, default="")
    # The agent's tools as they were (secret *names* only: headers keep their
    # `{{secret:NAME}}` templates, never values).
    tools = models.JSONField(default=list, blank=True)
    # Sections other apps add (agents.versions.version_section_register), e.g. memory
    # block definitions: {"section name": its snapshot}.
    sections = models.JSONField(default=dict, blank=True)
    # This version restores an older one (a rollback): its number.
    restored_from = models.PositiveIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["agent", "-number"]
        constraints = [
            models.UniqueConstraint(fields=["agent", "number"], name="agent_version_number_unique")
        ]

    def __str__(self) -> str:
        return f"{self.agent_id} v{self.number}"
