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

    # Deleting from the admin is the same delete as the API's: it records and runs the
    # workspace teardown instead of leaving it to the sweep.
    def delete_model(self, request, obj: Project) -> None:
        project_delete(project=obj)

    def delete_queryset(self, request, queryset) -> None:
        for project in queryset:
            project_delete(project=project)
