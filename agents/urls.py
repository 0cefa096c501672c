from django.urls import path

from . import events, waits
from .apis import agents, chat, context, runs, tools

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
    # A search waits for a worker without a thread (agents.waits); the other methods
    # are context.AgentContextApi's.
    path("agents/<uuid:agent_id>/context/", waits.agent_context, name="agent-context"),
    path(
        "agents/<uuid:agent_id>/context/jobs/<uuid:job_id>/",
        context.AgentContextJobApi.as_view(),
        name="agent-context-job",
    ),
    path("agents/<uuid:agent_id>/tools/", tools.ToolListCreateApi.as_view(), name="tool-list"),
    path(
        "agents/<uuid:agent_id>/tools/<uuid:tool_id>/",
        tools.ToolDetailApi.as_view(),
        name="tool-detail",
    ),
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
    path("secrets/", tools.SecretListCreateApi.as_view(), name="secret-list"),
    path("secrets/<str:name>/", tools.SecretDetailApi.as_view(), name="secret-detail"),
]
