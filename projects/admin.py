from django.contrib import admin
from django.db.models import Count
from django.urls import reverse
from django.utils.html import format_html

from .models import Project
from .services import FLOW_FIELDS, project_delete, project_flow_announce_on_commit


def _changelist_link(model: str, label: str, **filters) -> str:
    query = "&".join(f"{key}={value}" for key, value in filters.items())
    return format_html('<a href="{}?{}">{}</a>', reverse(f"admin:{model}_changelist"), query, label)


@admin.register(Project)
class ProjectAdmin(admin.ModelAdmin):
    # Agents and sessions are other apps' models: reached by their admin URLs and the
    # reverse relations' names, so this app imports nothing above it.
    list_display = (
        "name",
        "owner",
        "agents",
        "sessions",
        "workspace",
        "flow_weight",
        "flow_max_in_flight",
        "created_at",
        "updated_at",
    )
    list_filter = (("owner", admin.RelatedOnlyFieldListFilter), "created_at")
    search_fields = ("name", "description", "owner__username", "=id")
    list_select_related = ("owner",)
    ordering = ("-created_at",)
    readonly_fields = (
        "id",
        "created_at",
        "updated_at",
        "agents",
        "sessions",
        "workspace",
        "flow_now",
    )
    # The bus's live figures of a project (agentbus.flow), registered by the app that
    # reads the bus (workspaces.admin): project id -> {name: value}.
    flow_source = None
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

    @admin.display(description="flow on the bus now")
    def flow_now(self, obj: Project):
        source = type(self).flow_source
        if source is None or obj.pk is None:
            return "-"
        try:
            figures = source(obj.pk)
        except Exception:  # Redis down: the page still opens
            return "unavailable"
        return ", ".join(f"{name}: {value}" for name, value in figures.items())

    def save_model(self, request, obj: Project, form, change) -> None:
        super().save_model(request, obj, form, change)
        # The bus reads the rules from Redis: an operator's change reaches it on commit.
        if not change or any(name in form.changed_data for name in FLOW_FIELDS):
            project_flow_announce_on_commit(project=obj)

    # Deleting from the admin is the same delete as the API's.
    def delete_model(self, request, obj: Project) -> None:
        project_delete(project=obj)

    def delete_queryset(self, request, queryset) -> None:
        for project in queryset:
            project_delete(project=project)
