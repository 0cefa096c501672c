"""The admin: users are deleted through the lifecycle (projects torn down, data erased,
audit anonymised); projects' retention policies; the sweeps' reports."""

from django.contrib import admin
from django.contrib.auth import get_user_model
from django.contrib.auth.admin import UserAdmin

from .accounts import user_delete
from .models import RetentionPolicy, RetentionReport

User = get_user_model()


class LifecycleUserAdmin(UserAdmin):
    """Django's user admin, whose deletes are `user_delete`: each project deleted as a
    project delete does, the user's data erased, the audit trail anonymised."""

    def delete_model(self, request, obj) -> None:
        user_delete(user=obj)

    def delete_queryset(self, request, queryset) -> None:
        for user in queryset:
            user_delete(user=user)


if admin.site.is_registered(User):
    admin.site.unregister(User)
admin.site.register(User, LifecycleUserAdmin)


@admin.register(RetentionPolicy)
class RetentionPolicyAdmin(admin.ModelAdmin):
    list_display = ("project", *RetentionPolicy.KINDS, "updated_at")
    fields = ("project", *RetentionPolicy.KINDS)
    raw_id_fields = ("project",)
    search_fields = ("project__name", "=project__id")


@admin.register(RetentionReport)
class RetentionReportAdmin(admin.ModelAdmin):
    list_display = ("started_at", "finished_at", "projects", "chunks", "removed", "complete")
    readonly_fields = ("started_at", "finished_at", "projects", "chunks", "removed", "complete")

    def has_add_permission(self, request) -> bool:
        return False
