from django.urls import path

from . import apis

urlpatterns = [
    path("keys/", apis.ApiKeyListCreateApi.as_view(), name="api-key-list"),
    path("keys/<uuid:key_id>/", apis.ApiKeyDetailApi.as_view(), name="api-key-detail"),
    path("usage/", apis.UsageApi.as_view(), name="usage"),
    path("quotas/", apis.QuotasApi.as_view(), name="quotas"),
    path("provider/", apis.ProviderSettingsApi.as_view(), name="provider-settings"),
    path("audit/", apis.AuditListApi.as_view(), name="audit-list"),
]
