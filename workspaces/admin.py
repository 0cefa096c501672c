"""Django admin: the workspace registry (it lives in Redis, so the page is a custom
changelist over the registry rather than a queryset) and the teardown records."""

from __future__ import annotations

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import path

from .models import Workspace, WorkspaceTeardown
from .registry import parse_index_member
from .selectors import workspace_get, workspace_list
from .services import workspace_reset, workspace_teardown_dispatch, workspace_teardown_schedule

PAGE_SIZE = 100


@admin.register(Workspace)
class WorkspaceAdmin(admin.ModelAdmin):
    """Lists the registry: state, agents, queue depth, initialisation time, last use;
    actions reset and tear down."""

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj=None) -> bool:
        return False

    def get_urls(self):
        view = self.admin_site.admin_view(self.changelist_view)
        return [path("", view, name=f"{self.opts.app_label}_{self.opts.model_name}_changelist")]

    def changelist_view(self, request: HttpRequest, extra_context=None):
        if not self.has_view_or_change_permission(request):
            raise PermissionDenied
        if request.method == "POST":
            if not self.has_change_permission(request):
                raise PermissionDenied
            self._run_action(request)
            return HttpResponseRedirect(request.get_full_path())
        try:
            page = max(0, int(request.GET.get("p", 0)))
        except ValueError:
            page = 0
        views, total = workspace_list(offset=page * PAGE_SIZE, limit=PAGE_SIZE)
        context = {
            **self.admin_site.each_context(request),
            "title": "Workspaces",
            "opts": self.opts,
            "views": views,
            "total": total,
            "page": page,
            "previous_page": page - 1 if page > 0 else None,
            "next_page": page + 1 if (page + 1) * PAGE_SIZE < total else None,
            "can_change": self.has_change_permission(request),
            **(extra_context or {}),
        }
        return TemplateResponse(request, "admin/workspaces/registry.html", context)

    def _run_action(self, request: HttpRequest) -> None:
        action = request.POST.get("action")
        selected = [parse_index_member(m) for m in request.POST.getlist("selected")]
        selected = [s for s in selected if s is not None]
        if action not in ("reset", "teardown") or not selected:
            self.message_user(request, "Select workspaces and an action.", messages.WARNING)
            return
        done, refused = [], []
        for user_id, project_id in selected:
            view = workspace_get(user_id=user_id, project_id=project_id)
            if view is None:
                continue
            if action == "reset":
                workspace_reset(user_id=user_id, project_id=project_id)
                done.append(view.key)
            elif view.project_exists:
                # A live project's workspace is rebuilt on its next request; tearing it
                # down would drop its queued tasks and vector collections. Delete the
                # project to tear it down, or reset it.
                refused.append(view.key)
            else:
                workspace_teardown_schedule(user_id=user_id, project_id=project_id)
                done.append(view.key)
        verb = "Reset" if action == "reset" else "Teardown scheduled for"
        if done:
            self.message_user(request, f"{verb} {len(done)} workspace(s).", messages.SUCCESS)
        if refused:
            self.message_user(
                request,
                "Not torn down (the project exists; reset it, or delete the project): "
                + ", ".join(refused),
                messages.ERROR,
            )


@admin.register(WorkspaceTeardown)
class WorkspaceTeardownAdmin(admin.ModelAdmin):
    list_display = (
        "project_id",
        "user_id",
        "status",
        "attempts",
        "purged_tasks",
        "created_at",
        "last_attempt_at",
        "completed_at",
        "short_error",
    )
    list_filter = ("status",)
    search_fields = ("=project_id", "=user_id")
    readonly_fields = [f.name for f in WorkspaceTeardown._meta.fields]
    actions = ["dispatch_again"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj=None) -> bool:
        return False  # the record of what was torn down, and of what is still owed

    @admin.display(description="last error")
    def short_error(self, obj: WorkspaceTeardown) -> str:
        return obj.last_error[:120]

    @admin.action(description="Dispatch the selected pending teardowns again")
    def dispatch_again(self, request: HttpRequest, queryset) -> None:
        pending = queryset.filter(status=WorkspaceTeardown.Status.PENDING)
        sent = sum(workspace_teardown_dispatch(project_id=row.project_id) for row in pending)
        self.message_user(request, f"Dispatched {sent} teardown(s).", messages.SUCCESS)
