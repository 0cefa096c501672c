from django.urls import path

from . import apis

# Under /my/projects/<project_id>/.
project_urlpatterns = [
    path("retention/", apis.RetentionApi.as_view(), name="retention"),
]

# Under /my/.
account_urlpatterns = [
    path("account/", apis.AccountApi.as_view(), name="account"),
]
