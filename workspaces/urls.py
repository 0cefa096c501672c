from django.urls import path

from .apis import ProjectHealthApi, WorkspaceHealthApi, WorkspaceStatsApi


def _alias(view_class):
    """The same view under a second spelling of its path, left out of the schema."""
    return type(f"{view_class.__name__}Alias", (view_class,), {"schema": None}).as_view()


# Operators' paths, without a trailing slash; with one they answer the same (and not the
# admin's catch-all, which would redirect a token client to the login page).
urlpatterns = [
    path("health", WorkspaceHealthApi.as_view(), name="workspaces-health"),
    path("stats", WorkspaceStatsApi.as_view(), name="workspaces-stats"),
    path(
        "health/projects/<uuid:project_id>",
        ProjectHealthApi.as_view(),
        name="workspaces-project-health",
    ),
    path("health/", _alias(WorkspaceHealthApi)),
    path("stats/", _alias(WorkspaceStatsApi)),
    path("health/projects/<uuid:project_id>/", _alias(ProjectHealthApi)),
]
