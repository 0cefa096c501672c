from django import forms
from django.contrib import admin

from workspaces.services import workspace_agent_sync_on_commit

from .models import Agent, ChatSession, Message
from .services import agent_delete, session_delete
from .validators import validate_params


class AgentAdminForm(forms.ModelForm):
    """The admin checks an agent as the API does (agents.validators)."""

    class Meta:
        model = Agent
        fields = ("project", "name", "system_prompt", "model", "params")

    def clean_params(self):
        params = self.cleaned_data.get("params")
        validate_params(params if params is not None else {})
        return params


@admin.register(Agent)
class AgentAdmin(admin.ModelAdmin):
    form = AgentAdminForm
    list_display = ("name", "project", "model", "created_at", "updated_at")
    list_filter = ("model", "created_at")
    search_fields = ("name", "system_prompt", "project__name", "id")
    list_select_related = ("project",)
    readonly_fields = ("id", "created_at", "updated_at")
    raw_id_fields = ("project",)

    def get_readonly_fields(self, request, obj=None):
        # An agent never moves between projects: its cache entry and collection are theirs.
        return (*self.readonly_fields, "project") if obj else self.readonly_fields

    def save_model(self, request, obj: Agent, form, change) -> None:
        super().save_model(request, obj, form, change)
        workspace_agent_sync_on_commit(project_id=obj.project_id, agent_id=obj.id)

    def delete_model(self, request, obj: Agent) -> None:
        agent_delete(agent=obj)

    def delete_queryset(self, request, queryset) -> None:
        for agent in queryset:
            agent_delete(agent=agent)


class MessageInline(admin.TabularInline):
    model = Message
    extra = 0
    fields = ("role", "status", "content", "created_at")
    readonly_fields = ("created_at",)


@admin.register(ChatSession)
class ChatSessionAdmin(admin.ModelAdmin):
    list_display = ("__str__", "project", "agent", "created_at")
    list_filter = ("created_at",)
    search_fields = ("title", "project__name", "agent__name", "id")
    list_select_related = ("project", "agent")
    readonly_fields = ("id", "created_at")
    raw_id_fields = ("project", "agent")
    inlines = [MessageInline]

    def get_readonly_fields(self, request, obj=None):
        return (*self.readonly_fields, "project", "agent") if obj else self.readonly_fields

    def delete_model(self, request, obj: ChatSession) -> None:
        session_delete(session=obj)

    def delete_queryset(self, request, queryset) -> None:
        for session in queryset:
            session_delete(session=session)


@admin.register(Message)
class MessageAdmin(admin.ModelAdmin):
    list_display = ("id", "session", "role", "status", "short_content", "created_at")
    list_filter = ("role", "status", "created_at")
    search_fields = ("content", "session__id")
    list_select_related = ("session",)
    raw_id_fields = ("session",)

    @admin.display(description="content")
    def short_content(self, obj: Message) -> str:
        return obj.content[:80]
