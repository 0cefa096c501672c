from django.urls import path, re_path

from .apis import MetricsApi
from .views import deployment_dashboard, project_dashboard

# Under /admin/ (config.urls), before the admin's catch-all.
urlpatterns = [
    # Prometheus asks without a trailing slash; with one it is the same, never a redirect.
    re_path(r"^metrics/?$", MetricsApi.as_view(), name="metrics"),
    path("dashboard/", deployment_dashboard, name="observability-dashboard"),
    path(
        "dashboard/projects/<uuid:project_id>/",
        project_dashboard,
        name="observability-project-dashboard",
    ),
]
