"""Vector collections follow their agents and projects: created by the first write of
context, dropped when the agent goes, and all of a project's dropped by its teardown."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from agents.runtime.vectorstore import (
    close_vector_store,
    collection_name,
    get_vector_store,
)
from tests.factories import AgentFactory, ChatSessionFactory, ProjectFactory
from tests.runtime.conftest import wait_until
from workspaces.redis import workspace_prefix
from workspaces.signals import workspace_teardown

pytestmark = pytest.mark.slow


def name_of(agent) -> str:
    return collection_name(
        user_id=agent.project.owner_id, project_id=agent.project_id, agent_id=agent.id
    )


def test_collections_follow_agents_through_the_api(live_worker, api, project):
    response = api.post(f"/my/projects/{project.id}/agents/", {"name": "scribe"}, format="json")
    assert response.status_code == 201
    agent_id = response.json()["id"]
    name = collection_name(user_id=project.owner_id, project_id=project.id, agent_id=agent_id)
    store = get_vector_store()
    assert not store.exists(name)  # nothing stored yet: no collection

    url = f"/my/projects/{project.id}/agents/{agent_id}/context/"
    assert api.post(url, {"documents": ["a note"]}, format="json").status_code == 202
    wait_until(lambda: store.exists(name), what="collection created")

    assert api.delete(f"/my/projects/{project.id}/agents/{agent_id}/").status_code == 204
    wait_until(lambda: not store.exists(name), what="collection dropped")


def test_setting_up_a_workspace_does_not_make_its_queue_active(live_worker, project, agent):
    from agentbus.active import active_queues
    from workspaces.manager import get_worker_space

    get_worker_space(user_id=project.owner_id, project_id=project.id)
    assert active_queues() == []
    assert not get_vector_store().project_collections(
        user_id=project.owner_id, project_id=project.id
    )


def test_project_delete_drops_every_collection_and_stream(live_worker, api, user, redis_client):
    project, second = ProjectFactory(owner=user), ProjectFactory(owner=user)
    agents = [AgentFactory(project=project) for _ in range(2)]
    kept = AgentFactory(project=second)
    session = ChatSessionFactory(agent=agents[0], project=project)
    for agent in [*agents, kept]:
        url = f"/my/projects/{agent.project_id}/agents/{agent.id}/context/"
        assert api.post(url, {"documents": ["some context"]}, format="json").status_code == 202
    store = get_vector_store()
    wait_until(
        lambda: all(store.count(name_of(a)) == 1 for a in [*agents, kept]), what="context stored"
    )
    url = f"/my/projects/{project.id}/chat/{session.id}/messages/"
    assert api.post(url, {"content": "hi"}, format="json").status_code == 202

    assert api.delete(f"/my/projects/{project.id}/").status_code == 204
    wait_until(
        lambda: not store.project_collections(user_id=user.id, project_id=project.id),
        what="project collections dropped",
    )
    prefix = workspace_prefix(user.id, project.id)
    wait_until(lambda: not list(redis_client.scan_iter(match=prefix + "*")), what="keys gone")
    # The user's other project keeps its agent's context.
    assert store.count(name_of(kept)) == 1


def test_teardown_receiver_raises_while_the_store_is_unavailable(
    transactional_db, project, qdrant_path
):
    """Local mode lets one process hold the folder: while another does, the store cannot
    be opened, teardown raises (so its task retries), and it succeeds once it can."""
    agent = AgentFactory(project=project)
    store = get_vector_store()
    store.ensure_collection(name_of(agent), dim=384)
    close_vector_store()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import sys, time
                from qdrant_client import QdrantClient
                client = QdrantClient(path={qdrant_path!r})
                print("holding", flush=True)
                sys.stdin.readline()
                """
            ),
        ],
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
    workspace_teardown.send(sender=None, user_id=project.owner_id, project_id=project.id)
    assert not get_vector_store().exists(name_of(agent))
    # Idempotent: a retried teardown finds nothing left and succeeds.
    workspace_teardown.send(sender=None, user_id=project.owner_id, project_id=project.id)


def test_sweep_drops_collections_of_deleted_agents_only(transactional_db, project):
    from agents.runtime.vectors import collections_sweep

    store = get_vector_store()
    kept, gone = AgentFactory(project=project), AgentFactory(project=project)
    names = {"kept": name_of(kept), "gone": name_of(gone)}
    gone.delete()
    stranger = "not_one_of_ours"
    for name in [*names.values(), stranger]:
        store.ensure_collection(name, dim=384)
    # Someone else's id in the name: the agent exists, but not in this user's project.
    forged = collection_name(
        user_id=project.owner_id + 1000, project_id=project.id, agent_id=kept.id
    )
    store.ensure_collection(forged, dim=384)

    # (Other tests' agents are gone from the database too: their collections go as well.)
    dropped = collections_sweep()
    assert {names["gone"], forged} <= set(dropped) and names["kept"] not in dropped
    assert store.exists(names["kept"]) and store.exists(stranger)
    assert collections_sweep() == []
    store.drop_collection(stranger)
