from django.urls import path

from . import apis

# Under /my/projects/<project_id>/.
project_urlpatterns = [
    path("retention/", apis.RetentionApi.as_view(), name="retention"),
    path("exports/", apis.ExportListCreateApi.as_view(), name="export-list"),
    path("exports/<uuid:job_id>/", apis.ExportDetailApi.as_view(), name="export-detail"),
    path("exports/<uuid:job_id>/archive/", apis.ExportArchiveApi.as_view(), name="export-archive"),
]

# Under /my/projects/.
projects_urlpatterns = [
    path("import/", apis.ImportApi.as_view(), name="project-import"),
    path("imports/<uuid:job_id>/", apis.ImportDetailApi.as_view(), name="import-detail"),
]

# Under /my/.
account_urlpatterns = [
    path("account/", apis.AccountApi.as_view(), name="account"),
]
