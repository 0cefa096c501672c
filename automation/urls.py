from django.urls import path

from . import apis

urlpatterns = [
    path("schedules/", apis.ScheduleListCreateApi.as_view(), name="schedule-list"),
    path("schedules/<uuid:schedule_id>/", apis.ScheduleDetailApi.as_view(), name="schedule-detail"),
    path(
        "schedules/<uuid:schedule_id>/fires/",
        apis.ScheduleFireListApi.as_view(),
        name="schedule-fires",
    ),
    path("webhooks/", apis.WebhookListCreateApi.as_view(), name="webhook-list"),
    path("webhooks/<uuid:webhook_id>/", apis.WebhookDetailApi.as_view(), name="webhook-detail"),
    path(
        "webhooks/<uuid:webhook_id>/rotate-secret/",
        apis.WebhookSecretRotateApi.as_view(),
        name="webhook-rotate-secret",
    ),
    path(
        "webhooks/<uuid:webhook_id>/deliveries/",
        apis.DeliveryListApi.as_view(),
        name="webhook-deliveries",
    ),
    path(
        "webhooks/<uuid:webhook_id>/deliveries/<str:delivery_id>/replay/",
        apis.DeliveryReplayApi.as_view(),
        name="webhook-delivery-replay",
    ),
]
