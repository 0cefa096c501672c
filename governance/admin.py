from django.contrib import admin, messages

from .models import ProjectApiKey
from .services import api_key_revoke


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
        self.message_user(request, "Revoked.", messages.SUCCESS)
