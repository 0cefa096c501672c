"""Django admin: the workspace registry (it lives in Redis, so the page is a custom
changelist over the registry rather than a queryset) and the teardown records."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from django.contrib import admin, messages
from django.contrib.auth import get_user_model
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import path
from django.utils.html import format_html

from agentbus.flow import flow_control_on, flow_status
from projects.admin import ProjectAdmin
from projects.models import Project

from .models import Workspace, WorkspaceTeardown
from .registry import State, parse_index_member
from .selectors import WorkspaceView, workspace_get, workspace_list
from .services import workspace_reset, workspace_teardown_dispatch, workspace_teardown_schedule

PAGE_SIZE = 100
SEARCH_LIMIT = 100

# Badge colours per registry state: ready, on its way, or needing an operator.
_STATE_COLOURS = {
    State.INITIALIZED: "#2e7d32",
    State.INITIALIZING: "#1565c0",
    State.NOT_INITIALIZED: "#6d6d6d",
    State.ERROR: "#c62828",
}


def _when(epoch: float | None) -> datetime | None:
    return datetime.fromtimestamp(epoch, tz=UTC) if epoch else None


def _rows(views: list[WorkspaceView]) -> list[dict]:
    """What the page shows of each workspace: its view, its owner's name, its state as a
    badge and its times as datetimes (the template formats them for people)."""
    owners = dict(
        get_user_model()
        .objects.filter(pk__in={v.entry.user_id for v in views})
        .values_list("pk", "username")
    )
    rows = []
    for view in views:
        state = view.entry.state
        colour = "#c62828" if view.problems else _STATE_COLOURS.get(state, "#ef6c00")
        rows.append(
            {
                "view": view,
                "owner": owners.get(view.entry.user_id, f"user {view.entry.user_id} (deleted)"),
                "badge": format_html(
                    '<span class="state-badge" style="background:{};color:#fff;padding:1px 7px;'
                    'border-radius:9px;font-size:11px;white-space:nowrap">{}</span>',
                    colour,
                    state,
                ),
                "initialized_at": _when(view.entry.initialized_at),
                "last_used": _when(view.entry.last_used),
            }
        )
    return rows


def _search(query: str) -> list[WorkspaceView]:
    """The workspaces of the projects a search names: by project id, or by project or
    owner name (the registry is keyed by ids, so the search goes through the projects)."""
    try:
        projects = Project.objects.filter(id=uuid.UUID(query))
    except ValueError:
        projects = Project.objects.filter(name__icontains=query) | Project.objects.filter(
            owner__username__icontains=query
        )
    found = []
    for owner_id, project_id in projects.values_list("owner_id", "id")[:SEARCH_LIMIT]:
        view = workspace_get(user_id=owner_id, project_id=project_id)
        if view is not None:
            found.append(view)
    return found


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
        query = request.GET.get("q", "").strip()
        if query:
            views, page = _search(query), 0
            total = len(views)
            next_page = None
        else:
            views, total = workspace_list(offset=page * PAGE_SIZE, limit=PAGE_SIZE)
            next_page = page + 1 if (page + 1) * PAGE_SIZE < total else None
        context = {
            **self.admin_site.each_context(request),
            "title": "Workspaces",
            "opts": self.opts,
            "rows": _rows(views),
            "total": total,
            "query": query,
            "page": page,
            "previous_page": page - 1 if page > 0 and not query else None,
            "next_page": next_page,
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


def _flow_figures(project_id) -> dict:
    """The project admin's "flow on the bus now" (agentbus.flow.flow_status)."""
    status = flow_status([project_id])[str(project_id)]
    return {
        "rules applied": "yes" if flow_control_on() else "no (AGENTBUS_FLOW_CONTROL off)",
        "weight applied": status.weight,
        "cap applied": status.max_in_flight or "none",
        "in flight (capped slots)": status.in_flight,
        "waiting": status.waiting,
        "waiting bulk": status.waiting_bulk,
        "parked at cap": "yes" if status.parked else "no",
        "served": status.served,
        "served bulk": status.served_bulk,
        "cap waits": status.cap_waits,
    }


ProjectAdmin.flow_source = staticmethod(_flow_figures)
