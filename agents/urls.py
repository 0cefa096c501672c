from django.urls import path

from . import apis

urlpatterns = [
    path("agents/", apis.AgentListCreateApi.as_view(), name="agent-list"),
    path("agents/<uuid:agent_id>/", apis.AgentDetailApi.as_view(), name="agent-detail"),
    path("chat/", apis.SessionListCreateApi.as_view(), name="session-list"),
    path("chat/<uuid:session_id>/", apis.SessionDetailApi.as_view(), name="session-detail"),
    path(
        "chat/<uuid:session_id>/messages/",
        apis.MessageListCreateApi.as_view(),
        name="message-list",
    ),
]
