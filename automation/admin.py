"""Django admin for operators and owners: schedules (created and changed through the same
services as the API, so beat's row follows), their firings, webhook endpoints (the
secret never shown) and the delivery log, with a replay action."""

from django import forms
from django.contrib import admin

from .models import Schedule, ScheduleFire, WebhookAttempt, WebhookDelivery, WebhookEndpoint
from .schedules import (
    ScheduleInvalid,
    schedule_create,
    schedule_delete,
    schedule_update,
    timing_valid,
)
from .webhooks import delivery_replay


class ScheduleForm(forms.ModelForm):
    class Meta:
        model = Schedule
        fields = (
            "project", "agent", "session", "name", "content", "kind", "run_at", "cron",
            "timezone", "enabled",
        )  # fmt: skip

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["session"].required = False
        if self.instance.pk:
            for name in ("project", "agent", "session", "kind"):
                self.fields[name].disabled = True

    def clean(self):
        data = super().clean()
        agent, project = data.get("agent"), data.get("project")
        if agent and project and agent.project_id != project.id:
            self.add_error("agent", "Not an agent of this project.")
        session = data.get("session")
        if session and agent and session.agent_id != agent.id:
            self.add_error("session", "Not a session of this agent.")
        kind = data.get("kind") or self.instance.kind
        try:
            timing_valid(
                kind=kind, run_at=data.get("run_at"), cron=data.get("cron") or "",
                timezone_name=data.get("timezone") or "UTC",
                check_future=not self.instance.pk or "run_at" in self.changed_data,
            )  # fmt: skip
        except ScheduleInvalid as exc:
            self.add_error(exc.field if exc.field in self.fields else None, str(exc))
        return data


class ScheduleFireInline(admin.TabularInline):
    model = ScheduleFire
    extra = 0
    can_delete = False
    fields = readonly_fields = ("tick", "fired_at", "outcome", "detail", "message")
    ordering = ("-tick",)
    max_num = 0


@admin.register(Schedule)
class ScheduleAdmin(admin.ModelAdmin):
    form = ScheduleForm
    list_display = ("name", "project", "agent", "kind", "cron", "timezone", "run_at", "enabled")
    list_filter = ("kind", "enabled")
    search_fields = ("name", "=id", "project__name")
    list_select_related = ("project", "agent")
    raw_id_fields = ("project", "agent", "session")
    inlines = [ScheduleFireInline]

    def save_model(self, request, obj: Schedule, form, change) -> None:
        data = form.cleaned_data
        if change:
            schedule_update(schedule=obj, data=data)
        else:
            created = schedule_create(
                project=data["project"],
                agent=data["agent"],
                session=data.get("session"),
                name=data["name"],
                content=data["content"],
                kind=data["kind"],
                run_at=data.get("run_at"),
                cron=data.get("cron") or "",
                timezone_name=data.get("timezone") or "UTC",
                enabled=data.get("enabled", True),
            )
            obj.pk = created.pk

    def delete_model(self, request, obj: Schedule) -> None:
        schedule_delete(schedule=obj)

    def delete_queryset(self, request, queryset) -> None:
        for schedule in queryset:
            schedule_delete(schedule=schedule)


@admin.register(WebhookEndpoint)
class WebhookEndpointAdmin(admin.ModelAdmin):
    list_display = ("url", "project", "enabled", "consecutive_failures", "blocked_until")
    list_filter = ("enabled",)
    search_fields = ("url", "=id", "project__name")
    exclude = ("secret",)
    readonly_fields = ("consecutive_failures", "blocked_until", "created_at")
    raw_id_fields = ("project",)

    def has_add_permission(self, request) -> bool:
        return False  # the secret is made and shown by the API's create


class WebhookAttemptInline(admin.TabularInline):
    model = WebhookAttempt
    extra = 0
    can_delete = False
    fields = readonly_fields = ("number", "at", "status_code", "error", "duration_ms")
    max_num = 0


@admin.register(WebhookDelivery)
class WebhookDeliveryAdmin(admin.ModelAdmin):
    list_display = ("id", "endpoint", "event_type", "status", "attempts", "next_attempt_at")
    list_filter = ("status", "event_type")
    search_fields = ("=id", "endpoint__url")
    readonly_fields = (
        "id", "endpoint", "event_type", "body", "status", "attempts", "next_attempt_at",
        "created_at", "delivered_at",
    )  # fmt: skip
    inlines = [WebhookAttemptInline]
    actions = ["replay"]

    def has_add_permission(self, request) -> bool:
        return False

    @admin.action(description="Send again now (same webhook-id)")
    def replay(self, request, queryset) -> None:
        for delivery in queryset:
            delivery_replay(delivery=delivery)
        self.message_user(request, f"{queryset.count()} deliveries queued again.")
