from django.contrib import admin

from .models import Project
from .services import project_delete


@admin.register(Project)
class ProjectAdmin(admin.ModelAdmin):
    list_display = ("name", "owner", "created_at", "updated_at")
    list_filter = ("created_at",)
    search_fields = ("name", "description", "owner__username", "id")
    list_select_related = ("owner",)
    readonly_fields = ("id", "created_at", "updated_at")
    date_hierarchy = "created_at"

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
