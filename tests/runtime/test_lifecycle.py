"""Vector context follows its agents and projects: stored by the first write of
context, removed when the agent goes, and all of a project's removed by its teardown."""

from __future__ import annotations

import subprocess
import sys

import pytest

from agentbus.active import active_queues
from context.vectors import collections_sweep
from context.vectorstore import (
    TenantScope,
    close_vector_store,
    get_vector_store,
)
from tests.factories import AgentFactory, ChatSessionFactory, ProjectFactory
from tests.runtime.conftest import (
    HOLD_VECTOR_STORE,
    context_count,
    put_context,
    stored_agents,
)
from tests.workers import wait_until
from workspaces.manager import get_worker_space
from workspaces.redis import workspace_prefix
from workspaces.signals import workspace_teardown

pytestmark = pytest.mark.slow


def test_collections_follow_agents_through_the_api(live_worker, api, project):
    response = api.post(f"/my/projects/{project.id}/agents/", {"name": "scribe"}, format="json")
    assert response.status_code == 201
    agent = project.agents.get(id=response.json()["id"])
    assert context_count(agent) == 0  # nothing stored yet

    url = f"/my/projects/{project.id}/agents/{agent.id}/context/"
    assert api.post(url, {"documents": ["a note"]}, format="json").status_code == 202
    wait_until(lambda: context_count(agent) == 1, what="context stored")

    assert api.delete(f"/my/projects/{project.id}/agents/{agent.id}/").status_code == 204
    wait_until(lambda: context_count(agent) == 0, what="context removed")


def test_setting_up_a_workspace_does_not_make_its_queue_active(live_worker, project, agent):
    get_worker_space(user_id=project.owner_id, project_id=project.id)
    assert active_queues() == []
    assert stored_agents(project) == []


def test_project_delete_drops_every_collection_and_stream(live_worker, api, user, redis_client):
    project, second = ProjectFactory(owner=user), ProjectFactory(owner=user)
    agents = [AgentFactory(project=project) for _ in range(2)]
    kept = AgentFactory(project=second)
    session = ChatSessionFactory(agent=agents[0], project=project)
    for agent in [*agents, kept]:
        url = f"/my/projects/{agent.project_id}/agents/{agent.id}/context/"
        assert api.post(url, {"documents": ["some context"]}, format="json").status_code == 202
    wait_until(lambda: all(context_count(a) == 1 for a in [*agents, kept]), what="stored")
    url = f"/my/projects/{project.id}/chat/{session.id}/messages/"
    assert api.post(url, {"content": "hi"}, format="json").status_code == 202

    assert api.delete(f"/my/projects/{project.id}/").status_code == 204
    scope = TenantScope.project(user_id=user.id, project_id=project.id)
    wait_until(lambda: get_vector_store().count(scope) == 0, what="project context removed")
    prefix = workspace_prefix(user.id, project.id)
    wait_until(lambda: not list(redis_client.scan_iter(match=prefix + "*")), what="keys gone")
    # The user's other project keeps its agent's context.
    assert context_count(kept) == 1


def test_teardown_receiver_raises_while_the_store_is_unavailable(
    transactional_db, project, qdrant_path
):
    """The embedded store lets one process hold the folder: while another does, the
    store cannot be opened, teardown raises (so its task retries), and it succeeds once
    it can."""
    agent = AgentFactory(project=project)
    put_context(agent)
    close_vector_store()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_VECTOR_STORE, qdrant_path],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "holding"
        with pytest.raises(RuntimeError, match="already accessed"):
            workspace_teardown.send(sender=None, user_id=project.owner_id, project_id=project.id)
    finally:
        holder.communicate("\n", timeout=30)
        close_vector_store()
    workspace_teardown.send(sender=None, user_id=project.owner_id, project_id=project.id)
    assert context_count(agent) == 0
    # Idempotent: a retried teardown finds nothing left and succeeds.
    workspace_teardown.send(sender=None, user_id=project.owner_id, project_id=project.id)


def test_sweep_removes_the_context_of_deleted_agents_only(transactional_db, project):
    kept, gone = AgentFactory(project=project), AgentFactory(project=project)
    put_context(kept)
    put_context(gone)
    gone_name = stored_agents(project)
    gone.delete()
    # Someone else's id in the scope: the agent exists, but not in this user's project.
    put_context(kept, user_id=project.owner_id + 1000)

    # (Other tests' agents are gone from the database too: their context goes as well.)
    dropped = collections_sweep()
    forged = TenantScope.agent(
        user_id=project.owner_id + 1000, project_id=project.id, agent_id=kept.id
    ).collection
    assert forged in dropped and set(gone_name) - {kept_name(kept)} <= set(dropped)
    assert kept_name(kept) not in dropped and context_count(kept) == 1
    assert collections_sweep() == []


def kept_name(agent) -> str:
    return TenantScope.agent(
        user_id=agent.project.owner_id, project_id=agent.project_id, agent_id=agent.id
    ).collection


@pytest.mark.slow
def test_a_worker_that_cannot_open_the_embedded_store_refuses_to_start(
    transactional_db, project, qdrant_path, worker_process
):
    """Local mode serves one process: a second worker would take messages and fail
    their answers (`RuntimeError`). It refuses to start instead, with a one-line reason,
    before taking any message."""
    put_context(AgentFactory(project=project))
    close_vector_store()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_VECTOR_STORE, qdrant_path],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "holding"
        worker = worker_process("-Q", "uws.maintenance", "-P", "threads", "-c", "2")
        code = worker.wait(60)
        log = worker.log()
        assert code == 78, log
        lines = [ln for ln in log.splitlines() if "refusing to start" in ln]
        assert len(lines) == 1 and "already accessed by another instance" in lines[0], log
        assert "Traceback" not in log and "ready." not in log, log
    finally:
        holder.communicate("\n", timeout=30)
        close_vector_store()
