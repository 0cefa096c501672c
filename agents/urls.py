from django.urls import path

from . import apis, sse

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
    path("chat/<uuid:session_id>/cancel/", apis.SessionCancelApi.as_view(), name="session-cancel"),
    path("chat/<uuid:session_id>/events/", sse.session_events, name="session-events"),
    path("agents/<uuid:agent_id>/context/", apis.AgentContextApi.as_view(), name="agent-context"),
    path(
        "agents/<uuid:agent_id>/context/jobs/<uuid:job_id>/",
        apis.AgentContextJobApi.as_view(),
        name="agent-context-job",
    ),
]
