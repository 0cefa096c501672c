from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from common.apis import ObtainTokenApi
from common.views import RedocView, home
from lifecycle import urls as lifecycle_urls

urlpatterns = [
    path("", home, name="home"),
    path("admin/workspaces/", include("workspaces.urls")),
    # Metrics (Prometheus) and the dashboards, before the admin's catch-all.
    path("admin/", include("observability.urls")),
    path("admin/", admin.site.urls),
    path("auth/token/", ObtainTokenApi.as_view(), name="auth-token"),
    path("my/projects/", include("projects.urls")),
    # Each app's routes inside one project; config is the one place that knows them all.
    path("my/projects/<uuid:project_id>/", include("agents.urls")),
    path("my/projects/<uuid:project_id>/", include("chat.urls")),
    path("my/projects/<uuid:project_id>/", include("context.urls")),
    path("my/projects/<uuid:project_id>/", include("governance.urls")),
    path("my/projects/<uuid:project_id>/", include("automation.urls")),
    path("my/projects/<uuid:project_id>/", include(lifecycle_urls.project_urlpatterns)),
    path("my/", include(lifecycle_urls.account_urlpatterns)),
    path("my/projects/", include(lifecycle_urls.projects_urlpatterns)),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="swagger-ui"),
    path("api/redoc/", RedocView.as_view(url_name="schema"), name="redoc"),
]
