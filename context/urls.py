from django.urls import path

from . import apis, waits

urlpatterns = [
    # A search waits for a worker without a thread (context.waits); the other methods
    # are apis.AgentContextApi's.
    path("agents/<uuid:agent_id>/context/", waits.agent_context, name="agent-context"),
    path(
        "agents/<uuid:agent_id>/context/files/",
        apis.AgentContextFileListApi.as_view(),
        name="agent-context-file-list",
    ),
    path(
        "agents/<uuid:agent_id>/context/files/<uuid:document_id>/",
        apis.AgentContextFileDetailApi.as_view(),
        name="agent-context-file-detail",
    ),
    path(
        "agents/<uuid:agent_id>/context/jobs/<uuid:job_id>/",
        apis.AgentContextJobApi.as_view(),
        name="agent-context-job",
    ),
]
