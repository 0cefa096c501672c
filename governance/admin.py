from collections.abc import Callable

from django import forms
from django.contrib import admin, messages
from django.db.models import Count, OuterRef, Q, Subquery, Sum
from django.urls import reverse
from django.utils.html import format_html

from common.admin_pagination import LargeTablePaginator
from projects.models import Project

from .models import AuditEvent, EmbeddingUsage, ProjectApiKey, ProviderSettings, Quota, RunUsage
from .quotas import quota_delete, quota_save
from .services import api_key_revoke


def _project_name():
    """The name of the row's project (rows keep the project's id, not a foreign key:
    they outlive it), as one subquery of the list's query, not a query per row."""
    return Subquery(Project.objects.filter(id=OuterRef("project_id")).values("name")[:1])


def project_label(obj) -> str:
    """The project's name linked to its page, its id beside it; the id alone once gone."""
    if obj.project_id is None:
        return "—"
    name = getattr(obj, "project_name", None)
    if name is None:
        return format_html("<code>{}</code> (deleted)", str(obj.project_id)[:8])
    return format_html(
        '<a href="{}">{}</a> <code title="{}">{}</code>',
        reverse("admin:projects_project_change", args=[obj.project_id]),
        name,
        obj.project_id,
        str(obj.project_id)[:8],
    )


# An agent's name by its id, as a subquery of a list's query: the agents app (above this
# one) registers it with `agent_names_register`; without it a list shows the id alone.
_AGENT_NAME: dict[str, Callable[[], Subquery]] = {}


def agent_names_register(subquery: Callable[[], Subquery]) -> None:
    """`subquery()`: the name of the agent whose id is the row's `agent_id` (OuterRef)."""
    _AGENT_NAME["agent"] = subquery


class WithAgentNames:
    """List pages of rows that hold an agent's id: its name beside it."""

    def get_queryset(self, request):
        queryset = super().get_queryset(request)
        if "agent" in _AGENT_NAME:
            queryset = queryset.annotate(agent_name=_AGENT_NAME["agent"]())
        return queryset

    @admin.display(description="agent", ordering="agent_id")
    def agent(self, obj) -> str:
        if obj.agent_id is None:
            return "—"
        name = getattr(obj, "agent_name", None)
        short = format_html('<code title="{}">{}</code>', obj.agent_id, str(obj.agent_id)[:8])
        if name is None:
            return short
        return format_html(
            '<a href="{}">{}</a> {}',
            reverse("admin:agents_agent_change", args=[obj.agent_id]),
            name,
            short,
        )


class WithProjectNames:
    """List pages of rows that hold a project's id: its name beside it."""

    def get_queryset(self, request):
        return super().get_queryset(request).annotate(project_name=_project_name())

    @admin.display(description="project", ordering="project_name")
    def project(self, obj) -> str:
        return project_label(obj)


class RecentValuesFilter(admin.SimpleListFilter):
    """By a column's value, among those of the newest rows: DISTINCT over all the rows
    (Django's `AllValuesFieldListFilter`) is a scan of the table on every page."""

    recent = 2000

    def lookups(self, request, model_admin):
        newest = model_admin.model._default_manager.order_by("-created_at")
        values = {v for v in newest.values_list(self.parameter_name, flat=True)[: self.recent] if v}
        if self.value():
            values.add(self.value())
        return [(v, v) for v in sorted(values)]

    def queryset(self, request, queryset):
        value = self.value()
        return queryset.filter(**{self.parameter_name: value}) if value else queryset


class OutcomeFilter(RecentValuesFilter):
    title = parameter_name = "outcome"


class ProviderFilter(RecentValuesFilter):
    title = parameter_name = "provider"


class MethodFilter(RecentValuesFilter):
    title = parameter_name = "method"


class LargeTableAdmin(admin.ModelAdmin):
    """Lists of 100,000s of rows: counted up to a limit, or estimated when unfiltered
    (common.admin_pagination), once per page; no date hierarchy, whose year and month
    links are a DISTINCT over the whole table (the date filter stays)."""

    paginator = LargeTablePaginator
    show_full_result_count = False


class ReadOnlyAdmin(admin.ModelAdmin):
    """Records written by the app itself: operators read them, never edit them."""

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False


@admin.register(ProjectApiKey)
class ProjectApiKeyAdmin(admin.ModelAdmin):
    """Keys are created by their project's owner through the API (the key is shown
    once, to them); operators see them and can revoke them."""

    list_display = (
        "prefix",
        "name",
        "project",
        "scopes",
        "created_at",
        "last_used_at",
        "revoked_at",
    )
    list_filter = ("revoked_at", "created_at")
    search_fields = ("prefix", "name", "project__name", "=project__id")
    list_select_related = ("project",)
    readonly_fields = (
        "id",
        "project",
        "name",
        "prefix",
        "scopes",
        "created_by",
        "created_at",
        "last_used_at",
        "revoked_at",
    )
    exclude = ("key_hash",)
    actions = ["revoke"]

    def has_add_permission(self, request) -> bool:
        return False

    @admin.action(description="Revoke the selected keys")
    def revoke(self, request, queryset):
        for key in queryset.filter(revoked_at__isnull=True):
            api_key_revoke(key=key)
            self.log_change(request, key, "Revoked.")  # the audit log mirrors it
        self.message_user(request, "Revoked.", messages.SUCCESS)


class QuotaAdminForm(forms.ModelForm):
    """Says in words what the database's `quota_project_xor_user` rule wants."""

    class Meta:
        model = Quota
        fields = ("project", "user", *Quota.LIMITS)
        help_texts = {
            "project": "The project these limits hold for. Choose a project or a user, not both.",
            "user": "Or a user: the limits hold for all of the user's projects together.",
            "tokens_per_day": "Prompt + completion tokens per UTC day. Empty: no limit.",
            "tokens_per_month": "Prompt + completion tokens per calendar month (UTC). "
            "Empty: no limit.",
            "messages_per_minute": "Chat messages accepted per minute. Empty: no limit.",
            "concurrent_runs": "Answers in flight at once. Empty: no limit.",
        }

    def clean(self):
        cleaned = super().clean()
        project, user = cleaned.get("project"), cleaned.get("user")
        if project is None and user is None and not self.has_error("project"):
            message = "Choose the project or the user these limits are for."
            self.add_error("project", message)
            self.add_error("user", message)
        elif project is not None and user is not None:
            message = "Choose a project or a user, not both: a quota holds for one of them."
            self.add_error("project", message)
            self.add_error("user", message)
        return cleaned


@admin.register(Quota)
class QuotaAdmin(admin.ModelAdmin):
    """Operators set limits on a project or on a user (all their projects together);
    owners read them at …/quotas/. An empty limit is no limit."""

    form = QuotaAdminForm

    list_display = ("__str__", "project", "user", *Quota.LIMITS, "updated_at")
    list_select_related = ("project", "user")
    search_fields = ("project__name", "=project__id", "user__username")
    raw_id_fields = ("project", "user")
    fieldsets = ((None, {"fields": ("project", "user")}), ("Limits", {"fields": Quota.LIMITS}))

    # Through the services: the next admission in the quota's scope reads the change.
    def save_model(self, request, obj, form, change):
        quota_save(quota=obj)

    def delete_model(self, request, obj):
        quota_delete(quota=obj)

    def delete_queryset(self, request, queryset):
        for quota in queryset:
            quota_delete(quota=quota)


@admin.register(RunUsage)
class RunUsageAdmin(WithAgentNames, WithProjectNames, LargeTableAdmin, ReadOnlyAdmin):
    """Every agent run's accounting, read-only: it is written by the runs themselves."""

    # Narrow enough for a 1366 px screen beside the filters: the tokens in one column.
    list_display = (
        "created_at",
        "run_link",
        "project",
        "agent",
        "user",
        "model",
        "tokens",
        "tool_calls",
        "latency",
        "outcome",
    )
    list_filter = ("estimated", OutcomeFilter, ProviderFilter, "day")
    search_fields = ("=project_id", "=run_id", "=agent_id", "model", "user__username")
    list_select_related = ("user",)
    list_per_page = 50

    @admin.display(description="tokens (prompt + completion)", ordering="total_tokens")
    def tokens(self, obj) -> str:
        estimated = " (estimated)" if obj.estimated else ""
        return f"{obj.total_tokens} ({obj.prompt_tokens} + {obj.completion_tokens}){estimated}"

    @admin.display(description="latency", ordering="latency_ms")
    def latency(self, obj) -> str:
        return "—" if obj.latency_ms is None else f"{obj.latency_ms} ms"

    @admin.display(description="run", ordering="run_id")
    def run_link(self, obj) -> str:
        return format_html(
            '<a href="{}">{}</a>', reverse("admin:chat_run_change", args=[obj.run_id]),
            str(obj.run_id)[:8],
        )  # fmt: skip

    def changelist_view(self, request, extra_context=None):
        response = super().changelist_view(request, extra_context)
        changelist = getattr(response, "context_data", {}).get("cl")
        if changelist is not None and not changelist.paginator.count_is_exact:
            response.context_data["title"] = (
                f"Run usage: {changelist.paginator.count_label} runs (choose a day or a "
                "project for their totals)"
            )
        elif changelist is not None:  # the totals of what the filters select: counted,
            # so at most the paginator's limit; the slice says so to the planner too.
            selected = changelist.queryset.order_by()[: changelist.paginator.count_limit + 1]
            totals = selected.aggregate(
                runs=Count("run_id"),
                tokens=Sum("total_tokens"),
                estimated=Count("run_id", filter=Q(estimated=True)),
            )
            response.context_data["title"] = (
                f"Run usage: {totals['runs']} runs, {totals['tokens'] or 0} tokens "
                f"({totals['estimated']} runs estimated)"
            )
        return response


@admin.register(ProviderSettings)
class ProviderSettingsAdmin(admin.ModelAdmin):
    """Read-only here: the owner sets them through the API, the key is never shown."""

    list_display = ("project", "base_url", "has_api_key", "default_model", "updated_at")
    search_fields = ("project__name", "=project__id", "base_url")
    list_select_related = ("project",)
    fields = ("project", "base_url", "has_api_key", "default_model", "allowed_models", "updated_at")
    readonly_fields = fields

    @admin.display(boolean=True, description="API key set")
    def has_api_key(self, obj) -> bool:
        return obj.has_api_key

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False


@admin.register(AuditEvent)
class AuditEventAdmin(WithProjectNames, LargeTableAdmin, ReadOnlyAdmin):
    """The audit log, for operators: read-only (append-only; the purge alone deletes)."""

    list_display = (
        "created_at", "username", "credential", "key_prefix", "action", "object_repr",
        "project", "status_code", "ip_address",
    )  # fmt: skip
    list_filter = ("credential", MethodFilter, "created_at")
    search_fields = ("=project_id", "username", "action", "path", "object_repr", "key_prefix")


@admin.register(EmbeddingUsage)
class EmbeddingUsageAdmin(WithAgentNames, WithProjectNames, LargeTableAdmin, ReadOnlyAdmin):
    """Tokens embedded per stored ingest batch, read-only."""

    list_display = ("created_at", "project", "agent", "user", "model", "tokens", "job_id")
    list_filter = ("model", "day")
    search_fields = ("=project_id", "=agent_id", "job_id", "user__username")
    list_select_related = ("user",)
