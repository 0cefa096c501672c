from django.urls import path

from .apis import agents, memory, tools, versions

urlpatterns = [
    path("agents/", agents.AgentListCreateApi.as_view(), name="agent-list"),
    path("agents/<uuid:agent_id>/", agents.AgentDetailApi.as_view(), name="agent-detail"),
    path("agents/<uuid:agent_id>/tools/", tools.ToolListCreateApi.as_view(), name="tool-list"),
    path(
        "agents/<uuid:agent_id>/tools/<uuid:tool_id>/",
        tools.ToolDetailApi.as_view(),
        name="tool-detail",
    ),
    path(
        "agents/<uuid:agent_id>/versions/",
        versions.AgentVersionListApi.as_view(),
        name="agent-version-list",
    ),
    path(
        "agents/<uuid:agent_id>/versions/<int:number>/",
        versions.AgentVersionDetailApi.as_view(),
        name="agent-version-detail",
    ),
    path(
        "agents/<uuid:agent_id>/versions/<int:number>/diff/",
        versions.AgentVersionDiffApi.as_view(),
        name="agent-version-diff",
    ),
    path(
        "agents/<uuid:agent_id>/versions/<int:number>/rollback/",
        versions.AgentVersionRollbackApi.as_view(),
        name="agent-version-rollback",
    ),
    path("secrets/", tools.SecretListCreateApi.as_view(), name="secret-list"),
    path(
        "agents/<uuid:agent_id>/memory/",
        memory.MemoryBlockListCreateApi.as_view(),
        name="memory-block-list",
    ),
    path(
        "agents/<uuid:agent_id>/memory/changes/",
        memory.MemoryChangeListApi.as_view(),
        name="memory-change-list",
    ),
    path(
        "agents/<uuid:agent_id>/memory/<str:label>/",
        memory.MemoryBlockDetailApi.as_view(),
        name="memory-block-detail",
    ),
    path("secrets/<str:name>/", tools.SecretDetailApi.as_view(), name="secret-detail"),
]
