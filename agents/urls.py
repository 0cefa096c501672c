from django.urls import path

from . import events
from .apis import agents, chat, context

urlpatterns = [
    path("agents/", agents.AgentListCreateApi.as_view(), name="agent-list"),
    path("agents/<uuid:agent_id>/", agents.AgentDetailApi.as_view(), name="agent-detail"),
    path("chat/", chat.SessionListCreateApi.as_view(), name="session-list"),
    path("chat/<uuid:session_id>/", chat.SessionDetailApi.as_view(), name="session-detail"),
    path(
        "chat/<uuid:session_id>/messages/",
        chat.MessageListCreateApi.as_view(),
        name="message-list",
    ),
    path("chat/<uuid:session_id>/cancel/", chat.SessionCancelApi.as_view(), name="session-cancel"),
    path("chat/<uuid:session_id>/events/", events.session_events, name="session-events"),
    path(
        "agents/<uuid:agent_id>/context/", context.AgentContextApi.as_view(), name="agent-context"
    ),
    path(
        "agents/<uuid:agent_id>/context/jobs/<uuid:job_id>/",
        context.AgentContextJobApi.as_view(),
        name="agent-context-job",
    ),
]
