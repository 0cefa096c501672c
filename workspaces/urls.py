from django.http import Http404
from django.urls import path, re_path

from .apis import ProjectFlowApi, ProjectHealthApi, WorkspaceHealthApi, WorkspaceStatsApi


def _alias(view_class):
    """The same view under a second spelling of its path, left out of the schema."""
    return type(f"{view_class.__name__}Alias", (view_class,), {"schema": None}).as_view()


class _NoSuchProjectHealthApi(ProjectHealthApi):
    """A project path that is no project id: the same 404 (after the same permission
    checks), rather than the admin's catch-all login page."""

    schema = None

    def get(self, request, **kwargs):
        raise Http404("No such project.")


class _NoSuchProjectFlowApi(ProjectFlowApi):
    """The same for the flow rules' path."""

    schema = None

    def get(self, request, **kwargs):
        raise Http404("No such project.")

    patch = get


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
    re_path(r"^health/projects/", _NoSuchProjectHealthApi.as_view()),
    path("flow/projects/<uuid:project_id>", ProjectFlowApi.as_view(), name="workspaces-flow"),
    path("flow/projects/<uuid:project_id>/", _alias(ProjectFlowApi)),
    re_path(r"^flow/projects/", _NoSuchProjectFlowApi.as_view()),
]
