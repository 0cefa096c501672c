"""Django admin for operators: chat sessions and messages, newest first, with filters by
project, links and counts between related objects, and a session page that shows its
conversation read-only, a page at a time."""

import itertools
import uuid
from datetime import datetime
from urllib.parse import urlencode

from django.contrib import admin, messages
from django.contrib.admin.views.main import ChangeList
from django.core.paginator import Paginator
from django.db.models import Count, OuterRef, Q, Subquery
from django.db.models.functions import Left
from django.urls import reverse
from django.utils.html import format_html

from agents.admin import change_link, changelist_link
from agents.models import Agent
from common.admin_pagination import LargeTablePaginator
from governance.models import RunUsage
from projects.models import Project

from .models import ChatSession, Message, Run, WaitingRun
from .services import run_approve, run_reject, session_delete, session_run_cancel
from .suspend import ApprovalRefused

MESSAGES_PER_PAGE = 20

# Badge colours per message status: finished well, still going, ended badly.
_STATUS_COLOURS = {
    Message.Status.DONE: "#2e7d32",
    Message.Status.PENDING: "#6d6d6d",
    Message.Status.STREAMING: "#1565c0",
    Message.Status.ERROR: "#c62828",
    Message.Status.CANCELLED: "#ef6c00",
    Run.Status.QUEUED: "#6d6d6d",
    Run.Status.RUNNING: "#1565c0",
}


def status_badge(status: str):
    colour = _STATUS_COLOURS.get(status, "#6d6d6d")
    return format_html(
        '<span class="status-badge" style="background:{};color:#fff;padding:1px 7px;'
        'border-radius:9px;font-size:11px;white-space:nowrap">{}</span>',
        colour,
        status,
    )


@admin.register(ChatSession)
class ChatSessionAdmin(admin.ModelAdmin):
    list_display = ("__str__", "project_link", "owner", "agent_link", "messages_link", "created_at")
    list_filter = (
        ("project", admin.RelatedOnlyFieldListFilter),
        ("agent", admin.RelatedOnlyFieldListFilter),
        "created_at",
    )
    search_fields = ("title", "project__name", "agent__name", "project__owner__username", "=id")
    list_select_related = ("project", "project__owner", "agent")
    ordering = ("-created_at",)
    date_hierarchy = "created_at"
    readonly_fields = ("id", "created_at", "messages_link")
    raw_id_fields = ("project", "agent")
    # The conversation is shown read-only, a page at a time (change_form.html), not as an
    # inline of editable text areas.
    change_form_template = "admin/chat/chatsession/change_form.html"

    def get_queryset(self, request):
        return super().get_queryset(request).annotate(message_count=Count("messages"))

    @admin.display(description="project", ordering="project__name")
    def project_link(self, obj: ChatSession):
        return change_link("projects_project", obj.project)

    @admin.display(description="owner", ordering="project__owner__username")
    def owner(self, obj: ChatSession) -> str:
        return obj.project.owner.get_username()

    @admin.display(description="agent", ordering="agent__name")
    def agent_link(self, obj: ChatSession):
        return change_link("agents_agent", obj.agent)

    @admin.display(description="messages", ordering="message_count")
    def messages_link(self, obj: ChatSession):
        count = getattr(obj, "message_count", None)
        if count is None:
            count = obj.messages.count()
        return changelist_link("chat_message", str(count), session__id__exact=obj.pk)

    def get_readonly_fields(self, request, obj=None):
        return (*self.readonly_fields, "project", "agent") if obj else self.readonly_fields

    def change_view(self, request, object_id, form_url="", extra_context=None):
        extra_context = dict(extra_context or {})
        messages = Message.objects.filter(session_id=object_id).order_by("id")
        try:
            page = Paginator(messages, MESSAGES_PER_PAGE).get_page(request.GET.get("mp"))
        except Exception:  # noqa: BLE001  (a malformed session id: Django's own 404 follows)
            page = None
        if page is not None:
            extra_context["conversation"] = page
            extra_context["conversation_rows"] = [
                {"message": m, "badge": status_badge(m.status)} for m in page.object_list
            ]
        return super().change_view(request, object_id, form_url, extra_context)

    def delete_model(self, request, obj: ChatSession) -> None:
        session_delete(session=obj)

    def delete_queryset(self, request, queryset) -> None:
        for session in queryset:
            session_delete(session=session)


class ProjectFilter(admin.SimpleListFilter):
    """By project (its name), for runs and messages (through their session), without
    scanning their 100,000s of rows for the projects they have."""

    title = "project"
    parameter_name = "project"

    def lookups(self, request, model_admin):
        return [
            (str(pk), name)
            for pk, name in Project.objects.order_by("name").values_list("pk", "name")[:500]
        ]

    def queryset(self, request, queryset):
        value = self.value()
        return queryset.filter(session__project_id=value) if value else queryset

    def choices(self, changelist):
        """One link per project, built from one query string (Django builds and sorts
        the whole query string again for each of hundreds of choices)."""
        yield from itertools.islice(super().choices(changelist), 1)  # "All"
        base = changelist.get_query_string(remove=[self.parameter_name])
        joiner = "&" if len(base) > 1 else ""
        for pk, name in self.lookup_choices:
            yield {
                "selected": self.value() == pk,
                "query_string": f"{base}{joiner}{urlencode({self.parameter_name: pk})}",
                "display": name,
            }


# Characters of a message's text and error that its row in the list shows.
CONTENT_HEAD, ERROR_HEAD = 80, 120


class MessageChangeList(ChangeList):
    """A row shows the first characters of a message's text and error: the list reads
    only those (a long answer is not read whole for its row; a message's page reads it)."""

    def get_queryset(self, request, exclude_parameters=None):
        return (
            super()
            .get_queryset(request, exclude_parameters)
            .defer("content", "error")
            .annotate(
                content_head=Left("content", CONTENT_HEAD), error_head=Left("error", ERROR_HEAD)
            )
        )

    def get_results(self, request):
        super().get_results(request)
        for message in self.result_list:
            # What the row and str(message) (the checkbox's label) read: no query per row.
            message.content, message.error = message.content_head, message.error_head


@admin.register(Message)
class MessageAdmin(admin.ModelAdmin):
    list_display = (
        "id",
        "session_link",
        "project",
        "role",
        "status_badge",
        "short_content",
        "short_error",
        "created_at",
    )
    list_filter = ("status", "role", ProjectFilter, "created_at")
    search_fields = ("content", "error", "=session__id", "session__project__name")
    list_select_related = ("session", "session__project")
    ordering = ("-id",)
    list_per_page = 50
    # As many rows as runs: counted up to a limit (or estimated), no date hierarchy.
    paginator = LargeTablePaginator
    show_full_result_count = False
    raw_id_fields = ("session",)
    readonly_fields = ("id", "session", "role", "status", "content", "error", "created_at")
    fields = readonly_fields

    def get_changelist(self, request, **kwargs):
        return MessageChangeList

    def has_add_permission(self, request) -> bool:
        return False  # messages come from the chat API, answered through the bus

    def has_change_permission(self, request, obj=None) -> bool:
        return False  # the record of a conversation

    @admin.display(description="session", ordering="session__title")
    def session_link(self, obj: Message):
        return change_link("chat_chatsession", obj.session)

    @admin.display(description="project", ordering="session__project__name")
    def project(self, obj: Message) -> str:
        return obj.session.project.name

    @admin.display(description="status", ordering="status")
    def status_badge(self, obj: Message):
        return status_badge(obj.status)

    @admin.display(description="content")
    def short_content(self, obj: Message) -> str:
        return obj.content[:CONTENT_HEAD]

    @admin.display(description="error")
    def short_error(self, obj: Message) -> str:
        return obj.error[:ERROR_HEAD] or "—"


# --- Runs ------------------------------------------------------------------------------


class RunAgentFilter(admin.SimpleListFilter):
    """By agent: the agents of the project filtered by (all of them would be too many)."""

    title = "agent (pick a project first)"
    parameter_name = "agent"

    def lookups(self, request, model_admin):
        project = request.GET.get(ProjectFilter.parameter_name)
        if not project:
            return []
        try:
            agents = Agent.objects.filter(project_id=project).order_by("name")
            return [(str(pk), name) for pk, name in agents.values_list("pk", "name")[:500]]
        except Exception:  # noqa: BLE001  (a malformed id: no choices, Django says the rest)
            return []

    def queryset(self, request, queryset):
        value = self.value()
        return queryset.filter(agent_id=value) if value else queryset


class RunModelFilter(admin.SimpleListFilter):
    """By the model asked, among those of the last runs (not a scan of all of them)."""

    title = "model"
    parameter_name = "model"

    def lookups(self, request, model_admin):
        recent = Run.objects.order_by("-created_at").values_list("model", flat=True)[:2000]
        models = {m for m in recent if m} | ({self.value()} if self.value() else set())
        return [(m, m) for m in sorted(models)]

    def queryset(self, request, queryset):
        value = self.value()
        return queryset.filter(model=value) if value else queryset


class RunChangeList(ChangeList):
    """The list reads the columns it shows, not the 20-odd of a run and its relations
    (a run's page reads them all)."""

    def get_queryset(self, request, exclude_parameters=None):
        return (
            super()
            .get_queryset(request, exclude_parameters)
            .only(
                "id", "created_at", "status", "model", "error", "started_at", "finished_at",
                "session__id", "session__project__id", "session__project__name",
                "agent__id", "agent__name",
            )
        )  # fmt: skip


def _seconds(start: datetime | None, end: datetime | None) -> str:
    if start is None or end is None:
        return "—"
    return f"{(end - start).total_seconds():.2f} s"


@admin.register(Run)
class RunAdmin(admin.ModelAdmin):
    """Agent runs, newest first: what each did (status, model, tokens, timings, error),
    and on its page the steps and tool calls as a timeline beside its usage, its trace
    and links to its project, session, message, usage and audit log."""

    list_display = (
        "short_id",
        "created_at",
        "status_badge",
        "project_link",
        "agent_link",
        "model",
        "tokens",
        "queue_wait",
        "duration",
        "short_error",
    )
    list_filter = (
        "status",
        ProjectFilter,
        RunAgentFilter,
        RunModelFilter,
        "created_at",
    )
    search_fields = ("=id", "=trace_id", "=session__id", "=message__id", "error")
    list_select_related = ("session__project", "agent")
    ordering = ("-created_at",)
    list_per_page = 50
    # 100,000s of rows: never counted whole (see LargeTablePaginator), nor twice per page.
    paginator = LargeTablePaginator
    show_full_result_count = False
    change_form_template = "admin/chat/run/change_form.html"
    readonly_fields = (
        "id", "status", "trace_id", "model", "error", "attempt", "starts", "worker",
        "depth", "created_at", "dispatched_at", "started_at", "finished_at",
        "lease_expires_at",
    )  # fmt: skip
    fields = readonly_fields

    def get_queryset(self, request):
        tokens = RunUsage.objects.filter(run_id=OuterRef("pk")).order_by().values("total_tokens")
        # The steps' JSON is read on a run's own page only.
        return (
            super().get_queryset(request).defer("steps").annotate(usage_tokens=Subquery(tokens[:1]))
        )

    def get_changelist(self, request, **kwargs):
        return RunChangeList

    def get_search_results(self, request, queryset, search_term):
        """An id is looked up through its index: the run's, its session's, its trace's
        (whole), the run's first 8 or more hex digits (the list's short id; a range of
        the primary key), or a message's number. Django's `=` search compares
        UPPER(id::text) instead, a scan of every run. Other text is looked for in the
        errors."""
        term = search_term.strip()
        if not term:
            return queryset, False
        digits = term.replace("-", "").lower()
        by_id = Q()
        if term.isdigit() and len(term) <= 18:
            by_id |= Q(message_id=int(term))
        if len(digits) == 32 and _is_hex(digits):
            value = uuid.UUID(digits)
            by_id |= Q(id=value) | Q(session_id=value) | Q(trace_id=digits)
        elif 8 <= len(digits) < 32 and _is_hex(digits):
            low, high = uuid.UUID(digits.ljust(32, "0")), uuid.UUID(digits.ljust(32, "f"))
            by_id |= Q(id__gte=low, id__lte=high)
        if by_id:
            return queryset.filter(by_id), False
        return queryset.filter(error__icontains=term), False

    def has_add_permission(self, request) -> bool:
        return False  # runs come from chat messages, answered through the bus

    def has_change_permission(self, request, obj=None) -> bool:
        return False  # the record of what a run did; chat.state alone writes it

    def has_delete_permission(self, request, obj=None) -> bool:
        return False  # it goes with its message, session or project

    @admin.display(description="run", ordering="id")
    def short_id(self, obj: Run) -> str:
        return str(obj.pk)[:8]

    @admin.display(description="status", ordering="status")
    def status_badge(self, obj: Run):
        return status_badge(obj.status)

    @admin.display(description="project", ordering="session__project__name")
    def project_link(self, obj: Run):
        return change_link("projects_project", obj.session.project)

    @admin.display(description="agent", ordering="agent__name")
    def agent_link(self, obj: Run):
        return change_link("agents_agent", obj.agent)

    @admin.display(description="tokens", ordering="usage_tokens")
    def tokens(self, obj: Run):
        value = getattr(obj, "usage_tokens", None)
        return "—" if value is None else value

    @admin.display(description="queue wait")
    def queue_wait(self, obj: Run) -> str:
        return _seconds(obj.created_at, obj.started_at)

    @admin.display(description="duration")
    def duration(self, obj: Run) -> str:
        return _seconds(obj.started_at, obj.finished_at)

    @admin.display(description="error")
    def short_error(self, obj: Run) -> str:
        return obj.error[:100] or "—"

    def change_view(self, request, object_id, form_url="", extra_context=None):
        extra_context = dict(extra_context or {})
        run = (
            Run.objects.select_related("session__project__owner", "agent", "message", "parent")
            .filter(pk=object_id)
            .first()
            if _is_uuid(object_id)
            else None
        )
        if run is not None:
            extra_context.update(run_page_context(run))
        return super().change_view(request, object_id, form_url, extra_context)


def _is_hex(value: str) -> bool:
    return all(c in "0123456789abcdef" for c in value)


def _is_uuid(value) -> bool:
    try:
        uuid.UUID(str(value))
    except ValueError:
        return False
    return True


def run_page_context(run: Run) -> dict:
    """What a run's admin page shows beside its fields: the steps as a timeline, its
    usage, and links to what it belongs to."""
    project = run.session.project
    usage = RunUsage.objects.filter(run_id=run.pk).first()
    timeline = []
    origin = run.created_at
    events = [("accepted", run.created_at, ""), ("dispatched", run.dispatched_at, ""),
              ("started", run.started_at, run.worker)]  # fmt: skip
    for label, at, note in events:
        if at is not None:
            timeline.append({"kind": "run", "label": label, "at": at, "note": note})
    for step in run.steps or []:
        started = _parse(step.get("started_at"))
        finished = _parse(step.get("finished_at"))
        timeline.append(
            {
                "kind": step.get("type", "tool"),
                "label": f"step {step.get('step')}: {step.get('name', '?')}",
                "at": started,
                "status": step.get("status", ""),
                "badge": status_badge(
                    {"done": "done", "error": "error"}.get(step.get("status"), "running")
                ),
                "took": _seconds(started, finished),
                "arguments": step.get("arguments", ""),
                "result": step.get("result", ""),
                "child_run": step.get("child_run_id"),
            }
        )
    if run.finished_at is not None:
        timeline.append(
            {
                "kind": "run",
                "label": f"ended {run.status}",
                "at": run.finished_at,
                "note": run.error,
            }  # fmt: skip
        )
    # In time order (an entry without a time stays where it was).
    timeline.sort(key=lambda e: (e["at"] is None, e["at"] or origin))
    for entry in timeline:
        at = entry.get("at")
        entry["offset"] = (
            "" if at is None or origin is None else f"+{(at - origin).total_seconds():.3f} s"
        )
    links = [
        ("project", change_link("projects_project", project)),
        ("owner", project.owner.get_username()),
        ("session", change_link("chat_chatsession", run.session)),
        ("message", change_link("chat_message", run.message)),
        ("agent", change_link("agents_agent", run.agent)),
        ("usage", change_link("governance_runusage", usage) if usage else "—"),
        ("audit log", changelist_link("governance_auditevent", "the project's",
                                      project_id=project.pk)),
        ("project's runs", format_html('<a href="{}?project={}">all runs of {}</a>',
                                       reverse("admin:chat_run_changelist"), project.pk,
                                       project.name)),
    ]  # fmt: skip
    if run.parent_id:
        links.append(("asked by", change_link("chat_run", run.parent)))
    return {
        "run_timeline": timeline,
        "run_usage": usage,
        "run_links": links,
        "run_badge": status_badge(run.status),
        "run_message": run.message,
    }


def _parse(value) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value)
    except (TypeError, ValueError):
        return None


# --- Runs waiting for approval (chat.suspend) ----------------------------------------------


def _decide(modeladmin, request, queryset, decide, done: str) -> None:
    decided = refused = 0
    for run in queryset.select_related("session__project"):
        try:
            decide(run)
            decided += 1
        except ApprovalRefused:
            refused += 1  # decided meanwhile, cancelled or timed out
    if decided:
        modeladmin.message_user(request, f"{decided} run(s) {done}; they resume on a worker.")
    if refused:
        modeladmin.message_user(
            request, f"{refused} run(s) no longer wait for an approval.", messages.WARNING
        )


@admin.action(description="Approve the waiting tool calls (as the model wrote them)")
def approve_calls(modeladmin, request, queryset) -> None:
    by = f"admin:{request.user.get_username()}"
    _decide(modeladmin, request, queryset, lambda run: run_approve(run=run, by=by), "approved")


@admin.action(description="Reject the waiting tool calls (the model is told)")
def reject_calls(modeladmin, request, queryset) -> None:
    by = f"admin:{request.user.get_username()}"
    reason = f"rejected by an operator ({request.user.get_username()})"
    _decide(
        modeladmin,
        request,
        queryset,
        lambda run: run_reject(run=run, reason=reason, by=by),
        "rejected",
    )


@admin.action(description="Cancel the runs")
def cancel_runs(modeladmin, request, queryset) -> None:
    stopped = sum(
        session_run_cancel(run=run) for run in queryset.select_related("session__project")
    )
    modeladmin.message_user(request, f"{stopped} run(s) cancelled.")


@admin.register(WaitingRun)
class WaitingRunAdmin(admin.ModelAdmin):
    list_display = ("id", "project", "agent", "calls", "waiting_until", "created_at")
    list_filter = (("session__project", admin.RelatedOnlyFieldListFilter),)
    search_fields = ("=id", "session__project__name", "agent__name")
    list_select_related = ("session__project", "agent")
    ordering = ("waiting_until",)
    actions = (approve_calls, reject_calls, cancel_runs)
    readonly_fields = ("id", "session", "agent", "status", "steps", "waiting_until", "created_at")
    fields = readonly_fields

    def get_queryset(self, request):
        return (
            super()
            .get_queryset(request)
            .filter(status=Run.Status.WAITING, suspended__reason="approval")
        )

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False  # decided through the actions, which resume the run

    @admin.display(description="project", ordering="session__project__name")
    def project(self, obj: Run) -> str:
        return obj.session.project.name

    @admin.display(description="calls awaiting approval")
    def calls(self, obj: Run) -> str:
        waiting = set((obj.suspended or {}).get("approval") or ())
        # From the steps: their arguments are scrubbed of the project's secrets.
        return "; ".join(
            f"{step['name']}({step.get('arguments', '')[:120]})"
            for step in obj.steps or ()
            if step.get("call_id") in waiting and step.get("status") == "awaiting-approval"
        )
