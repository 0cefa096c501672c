"""Django admin for operators: chat sessions and messages, newest first, with filters by
project, links and counts between related objects, and a session page that shows its
conversation read-only, a page at a time."""

from django.contrib import admin, messages
from django.core.paginator import Paginator
from django.db.models import Count
from django.utils.html import format_html

from agents.admin import change_link, changelist_link

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
    list_filter = (
        "status",
        "role",
        ("session__project", admin.RelatedOnlyFieldListFilter),
        "created_at",
    )
    search_fields = ("content", "error", "=session__id", "session__project__name")
    list_select_related = ("session", "session__project")
    ordering = ("-id",)
    date_hierarchy = "created_at"
    raw_id_fields = ("session",)
    readonly_fields = ("id", "session", "role", "status", "content", "error", "created_at")
    fields = readonly_fields

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
        return obj.content[:80]

    @admin.display(description="error")
    def short_error(self, obj: Message) -> str:
        return obj.error[:120] or "—"


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
