from django.urls import path

from . import events
from .apis import chat, runs

urlpatterns = [
    path("chat/", chat.SessionListCreateApi.as_view(), name="session-list"),
    path("chat/<uuid:session_id>/", chat.SessionDetailApi.as_view(), name="session-detail"),
    path(
        "chat/<uuid:session_id>/messages/",
        chat.MessageListCreateApi.as_view(),
        name="message-list",
    ),
    path("chat/<uuid:session_id>/cancel/", chat.SessionCancelApi.as_view(), name="session-cancel"),
    path("chat/<uuid:session_id>/events/", events.session_events, name="session-events"),
    path("chat/<uuid:session_id>/runs/", runs.RunListApi.as_view(), name="run-list"),
    path(
        "chat/<uuid:session_id>/runs/<uuid:run_id>/",
        runs.RunDetailApi.as_view(),
        name="run-detail",
    ),
    path(
        "chat/<uuid:session_id>/runs/<uuid:run_id>/cancel/",
        runs.RunCancelApi.as_view(),
        name="run-cancel",
    ),
    path(
        "chat/<uuid:session_id>/regenerate/",
        runs.RegenerateApi.as_view(),
        name="session-regenerate",
    ),
    path("runs/<uuid:run_id>/approve/", runs.RunApproveApi.as_view(), name="run-approve"),
    path("runs/<uuid:run_id>/reject/", runs.RunRejectApi.as_view(), name="run-reject"),
]
