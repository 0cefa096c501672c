"""Django admin for operators: agents, their tools and the projects' secrets, newest
first, with filters by project and links and counts between related objects."""

from django import forms
from django.conf import settings
from django.contrib import admin
from django.db.models import Count, OuterRef, Subquery
from django.urls import reverse
from django.utils.html import format_html, format_html_join

from governance.admin import agent_names_register
from workspaces.services import workspace_agent_sync_on_commit

from .memory import memory_block_create, memory_block_delete, memory_block_update
from .models import Agent, AgentVersion, MemoryBlock, MemoryChange, ProjectSecret, Tool
from .services import TOOL_FIELDS, agent_delete, agent_version_rollback
from .tool_validation import validate_tool
from .validators import validate_params
from .versions import agent_version_record

# Governance's usage lists keep agent ids (their rows outlive the agents): the names beside.
agent_names_register(
    lambda: Subquery(Agent.objects.filter(id=OuterRef("agent_id")).values("name")[:1])
)


def changelist_link(model: str, label: str, **filters) -> str:
    """A link to another changelist, filtered (e.g. a project's agents)."""
    query = "&".join(f"{key}={value}" for key, value in filters.items())
    return format_html('<a href="{}?{}">{}</a>', reverse(f"admin:{model}_changelist"), query, label)


def change_link(model: str, obj) -> str:
    if obj is None:
        return "—"
    return format_html('<a href="{}">{}</a>', reverse(f"admin:{model}_change", args=[obj.pk]), obj)


class AgentAdminForm(forms.ModelForm):
    """The admin checks an agent as the API does (agents.validators)."""

    class Meta:
        model = Agent
        fields = ("project", "name", "system_prompt", "model", "params", "busy_policy")

    def clean_params(self):
        params = self.cleaned_data.get("params")
        validate_params(params if params is not None else {})
        return params


@admin.register(Agent)
class AgentAdmin(admin.ModelAdmin):
    form = AgentAdminForm
    list_display = ("name", "project_link", "owner", "model", "sessions_link", "created_at")
    list_filter = (("project", admin.RelatedOnlyFieldListFilter), "model", "created_at")
    search_fields = ("name", "system_prompt", "project__name", "project__owner__username", "=id")
    list_select_related = ("project", "project__owner")
    ordering = ("-created_at",)
    date_hierarchy = "created_at"
    readonly_fields = ("id", "created_at", "updated_at", "versions")
    raw_id_fields = ("project",)

    def get_queryset(self, request):
        return super().get_queryset(request).annotate(session_count=Count("sessions"))

    # A read-only list, not an inline: versions are never edited, and an inline's
    # formset would have to be posted with every change of the agent.
    @admin.display(description="versions (newest first)")
    def versions(self, obj: Agent):
        if obj.pk is None:
            return "—"
        links = [
            change_link("agents_agentversion", version)
            for version in obj.versions.order_by("-number")[:20]
        ]
        return format_html_join(", ", "{}", ((link,) for link in links)) or "—"

    @admin.display(description="project", ordering="project__name")
    def project_link(self, obj: Agent):
        return change_link("projects_project", obj.project)

    @admin.display(description="owner", ordering="project__owner__username")
    def owner(self, obj: Agent) -> str:
        return obj.project.owner.get_username()

    @admin.display(description="sessions", ordering="session_count")
    def sessions_link(self, obj: Agent):
        return changelist_link("chat_chatsession", str(obj.session_count), agent__id__exact=obj.pk)

    def get_readonly_fields(self, request, obj=None):
        # An agent never moves between projects: its cache entry and collection are theirs.
        return (*self.readonly_fields, "project") if obj else self.readonly_fields

    def save_model(self, request, obj: Agent, form, change) -> None:
        super().save_model(request, obj, form, change)
        agent_version_record(agent=obj)
        workspace_agent_sync_on_commit(project_id=obj.project_id, agent_id=obj.id)

    def delete_model(self, request, obj: Agent) -> None:
        agent_delete(agent=obj)

    def delete_queryset(self, request, queryset) -> None:
        for agent in queryset:
            agent_delete(agent=agent)


class ToolAdminForm(forms.ModelForm):
    """The admin checks a tool as the API does (agents.tool_validation)."""

    class Meta:
        model = Tool
        fields = ("agent", *TOOL_FIELDS)

    def clean(self):
        data = super().clean()
        target, agent = data.get("target_agent"), data.get("agent")
        if target is not None and agent is not None and target.project_id != agent.project_id:
            self.add_error("target_agent", "Must be an agent of the same project.")
        if not self.errors:
            try:
                validate_tool(data)
            except forms.ValidationError as exc:
                for field, messages in exc.message_dict.items():
                    field = "target_agent" if field == "target_agent_id" else field
                    self.add_error(field if field in self.fields else None, messages)
        return data


@admin.register(Tool)
class ToolAdmin(admin.ModelAdmin):
    form = ToolAdminForm
    list_display = ("name", "kind", "agent_link", "method", "url_template", "created_at")
    list_filter = ("kind", ("agent__project", admin.RelatedOnlyFieldListFilter))
    search_fields = ("name", "url_template", "agent__name", "agent__project__name", "=id")
    list_select_related = ("agent",)
    ordering = ("-created_at",)
    readonly_fields = ("id", "created_at", "updated_at")
    raw_id_fields = ("agent", "target_agent")

    @admin.display(description="agent", ordering="agent__name")
    def agent_link(self, obj: Tool):
        return change_link("agents_agent", obj.agent)

    # A tool is part of its agent's definition: each change makes a version.
    def save_model(self, request, obj: Tool, form, change) -> None:
        super().save_model(request, obj, form, change)
        agent_version_record(agent=obj.agent)

    def delete_model(self, request, obj: Tool) -> None:
        agent = obj.agent
        super().delete_model(request, obj)
        agent_version_record(agent=agent)

    def delete_queryset(self, request, queryset) -> None:
        agents = {tool.agent for tool in queryset.select_related("agent")}
        super().delete_queryset(request, queryset)
        for agent in agents:
            agent_version_record(agent=agent)


@admin.register(AgentVersion)
class AgentVersionAdmin(admin.ModelAdmin):
    """Versions are immutable: read-only here; the one action rolls an agent back to
    the chosen version (as a new version)."""

    list_display = ("__str__", "agent_link", "number", "model", "restored_from", "created_at")
    list_filter = (("agent__project", admin.RelatedOnlyFieldListFilter),)
    search_fields = ("agent__name", "=agent__id")
    list_select_related = ("agent",)
    ordering = ("-created_at",)
    actions = ("rollback",)

    def get_readonly_fields(self, request, obj=None):
        return [field.name for field in AgentVersion._meta.fields]

    def has_add_permission(self, request) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False

    @admin.display(description="agent", ordering="agent__name")
    def agent_link(self, obj: AgentVersion):
        return change_link("agents_agent", obj.agent)

    @admin.action(description="Roll the agent back to this version", permissions=["change"])
    def rollback(self, request, queryset) -> None:
        if queryset.count() != 1:
            self.message_user(request, "Choose one version.", level="error")
            return
        version = queryset.select_related("agent").get()
        new, skipped = agent_version_rollback(agent=version.agent, version=version)
        note = f" (tools not restored: {', '.join(skipped)})" if skipped else ""
        self.message_user(request, f"{version.agent} is now v{new.number}, equal to "
                          f"v{version.number}{note}.")  # fmt: skip


class ProjectSecretAdminForm(forms.ModelForm):
    """The value can be set, never read back: the field starts empty, and left empty on a
    change it keeps the stored value."""

    value = forms.CharField(
        widget=forms.PasswordInput(render_value=False),
        required=False,
        max_length=4096,
        help_text="Write-only. Left empty, the stored value is kept.",
    )

    class Meta:
        model = ProjectSecret
        fields = ("project", "name", "value")

    def clean_value(self):
        value = self.cleaned_data.get("value")
        if not value:
            if self.instance.pk is None:
                raise forms.ValidationError("A new secret needs a value.")
            return self.instance.value
        return value


@admin.register(ProjectSecret)
class ProjectSecretAdmin(admin.ModelAdmin):
    form = ProjectSecretAdminForm
    list_display = ("name", "project_link", "updated_at")
    list_filter = (("project", admin.RelatedOnlyFieldListFilter),)
    search_fields = ("name", "project__name")
    list_select_related = ("project",)
    readonly_fields = ("id", "created_at", "updated_at")
    raw_id_fields = ("project",)

    @admin.display(description="project", ordering="project__name")
    def project_link(self, obj: ProjectSecret):
        return change_link("projects_project", obj.project)


class MemoryBlockAdminForm(forms.ModelForm):
    class Meta:
        model = MemoryBlock
        fields = ("agent", "label", "value", "limit", "description")

    def clean(self):
        data = super().clean()
        value, limit = data.get("value") or "", data.get("limit") or 0
        if limit > settings.MEMORY_BLOCK_MAX_CHARS:
            self.add_error("limit", f"At most {settings.MEMORY_BLOCK_MAX_CHARS}.")
        elif len(value) > limit:
            self.add_error("value", f"Holds {len(value)} characters; the limit is {limit}.")
        return data


@admin.register(MemoryBlock)
class MemoryBlockAdmin(admin.ModelAdmin):
    """Operators edit memory blocks as owners do; each change is a MemoryChange by
    `admin` (agents.memory), besides the admin's own log."""

    form = MemoryBlockAdminForm
    list_display = ("label", "agent_link", "limit", "updated_at")
    list_filter = (("agent__project", admin.RelatedOnlyFieldListFilter),)
    search_fields = ("label", "agent__name", "=agent__id")
    list_select_related = ("agent",)
    readonly_fields = ("id", "created_at", "updated_at")
    raw_id_fields = ("agent",)

    @admin.display(description="agent", ordering="agent__name")
    def agent_link(self, obj: MemoryBlock):
        return change_link("agents_agent", obj.agent)

    def save_model(self, request, obj: MemoryBlock, form, change) -> None:
        data = {f: getattr(obj, f) for f in ("label", "value", "limit", "description")}
        if change:
            memory_block_update(block=obj, data=data, actor="admin")
        else:
            obj.pk = memory_block_create(agent=obj.agent, data=data, actor="admin").pk

    def delete_model(self, request, obj: MemoryBlock) -> None:
        memory_block_delete(block=obj, actor="admin")

    def delete_queryset(self, request, queryset) -> None:
        for block in queryset:
            memory_block_delete(block=block, actor="admin")


@admin.register(MemoryChange)
class MemoryChangeAdmin(admin.ModelAdmin):
    list_display = ("created_at", "label", "action", "actor", "agent", "run_id")
    list_filter = ("actor", "action")
    search_fields = ("label", "=agent__id", "=run_id")
    list_select_related = ("agent",)

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False
