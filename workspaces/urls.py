from django.urls import path

from .apis import WorkspaceHealthApi, WorkspaceStatsApi

# Operators' paths, without a trailing slash.
urlpatterns = [
    path("health", WorkspaceHealthApi.as_view(), name="workspaces-health"),
    path("stats", WorkspaceStatsApi.as_view(), name="workspaces-stats"),
]
