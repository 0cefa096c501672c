from django.contrib import admin
from django.db.models import Count
from django.urls import reverse
from django.utils.html import format_html

from .models import Project
from .services import project_delete


def _changelist_link(model: str, label: str, **filters) -> str:
    query = "&".join(f"{key}={value}" for key, value in filters.items())
    return format_html('<a href="{}?{}">{}</a>', reverse(f"admin:{model}_changelist"), query, label)


@admin.register(Project)
class ProjectAdmin(admin.ModelAdmin):
    # Agents and sessions are other apps' models: reached by their admin URLs and the
    # reverse relations' names, so this app imports nothing above it.
    list_display = ("name", "owner", "agents", "sessions", "workspace", "created_at", "updated_at")
    list_filter = (("owner", admin.RelatedOnlyFieldListFilter), "created_at")
    search_fields = ("name", "description", "owner__username", "=id")
    list_select_related = ("owner",)
    ordering = ("-created_at",)
    readonly_fields = ("id", "created_at", "updated_at", "agents", "sessions", "workspace")
    date_hierarchy = "created_at"

    def get_queryset(self, request):
        return (
            super()
            .get_queryset(request)
            .annotate(
                agent_count=Count("agents", distinct=True),
                session_count=Count("sessions", distinct=True),
            )
        )

    @admin.display(description="agents", ordering="agent_count")
    def agents(self, obj: Project):
        count = getattr(obj, "agent_count", None)
        count = obj.agents.count() if count is None else count
        return _changelist_link("agents_agent", str(count), project__id__exact=obj.pk)

    @admin.display(description="chat sessions", ordering="session_count")
    def sessions(self, obj: Project):
        count = getattr(obj, "session_count", None)
        count = obj.sessions.count() if count is None else count
        return _changelist_link("chat_chatsession", str(count), project__id__exact=obj.pk)

    @admin.display(description="workspace")
    def workspace(self, obj: Project):
        # The registry lives in Redis: its page finds the project's row by the project id.
        return _changelist_link("workspaces_workspace", "state", q=obj.pk)

    def get_readonly_fields(self, request, obj=None):
        # The owner is part of the project's identity: its workspace, keys and vector
        # collections are named after it. It is chosen at creation and never changed.
        return (*self.readonly_fields, "owner") if obj else self.readonly_fields

    # Deleting from the admin is the same delete as the API's.
    def delete_model(self, request, obj: Project) -> None:
        project_delete(project=obj)

    def delete_queryset(self, request, queryset) -> None:
        for project in queryset:
            project_delete(project=project)
