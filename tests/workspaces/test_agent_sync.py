"""Agent create/update/delete through the API keep the workspace's AgentCache in step
(after commit); reads never touch the workspace."""

from __future__ import annotations

import pytest

from agents.models import Agent
from agents.services import agent_create
from tests.factories import AgentFactory, ProjectFactory
from tests.workspaces.conftest import keys_under
from workspaces.manager import get_worker_space


@pytest.mark.django_db(transaction=True)
def test_create_update_delete_through_the_api(api, project):
    url = f"/my/projects/{project.id}/agents/"
    space = get_worker_space(user_id=project.owner_id, project_id=project.id)
    assert space.agent_cache.ids() == set()

    created = api.post(url, {"name": "scout", "system_prompt": "Look."}, format="json")
    assert created.status_code == 201
    agent_id = created.json()["id"]
    assert space.agent_cache.peek(agent_id)["system_prompt"] == "Look."

    patched = api.patch(f"{url}{agent_id}/", {"system_prompt": "Look closer."}, format="json")
    assert patched.status_code == 200
    assert space.agent_cache.peek(agent_id)["system_prompt"] == "Look closer."

    assert api.delete(f"{url}{agent_id}/").status_code == 204
    assert space.agent_cache.peek(agent_id) is None
    assert space.agent_cache.ids() == set()


@pytest.mark.django_db(transaction=True)
def test_reads_do_not_bring_a_workspace_to_life(api, project, agent, session):
    base = f"/my/projects/{project.id}"
    for path in ("/", "/agents/", f"/agents/{agent.id}/", "/chat/", f"/chat/{session.id}/"):
        assert api.get(base + path).status_code == 200, path
    assert not keys_under(project.owner_id, project.id)


@pytest.mark.django_db(transaction=True)
def test_a_rejected_agent_write_changes_nothing_in_the_workspace(api, project):
    url = f"/my/projects/{project.id}/agents/"
    space = get_worker_space(user_id=project.owner_id, project_id=project.id)
    before = space.agent_cache.all()

    response = api.post(url, {"name": "x" * 201}, format="json")

    assert response.status_code == 400 and "name" in response.json()
    assert space.agent_cache.all() == before


@pytest.mark.django_db(transaction=True)
def test_an_agent_created_before_the_workspace_exists_is_loaded_by_initialisation(user):
    project = ProjectFactory(owner=user)
    agent = agent_create(project=project, name="early")
    # No workspace yet: the write left Redis alone.
    assert not keys_under(user.pk, project.id)

    space = get_worker_space(user_id=user.pk, project_id=project.id)
    assert space.agent_cache.ids() == {str(agent.id)}


@pytest.mark.django_db(transaction=False)
def test_nothing_reaches_the_workspace_if_the_transaction_rolls_back(project):
    space = get_worker_space(user_id=project.owner_id, project_id=project.id)
    # The `db` fixture's transaction never commits: on-commit hooks never run.
    agent_create(project=project, name="uncommitted")
    assert space.agent_cache.ids() == set()


@pytest.mark.django_db(transaction=True)
def test_agent_writes_the_cache_missed_are_healed_at_revalidation(project, settings):
    """A write whose after-commit sync never reached Redis (Redis down at that moment, or
    a write that bypassed the services) is noticed by the next revalidation and synced
    from the database."""
    kept, renamed, dropped = (AgentFactory(project=project) for _ in range(3))
    space = get_worker_space(user_id=project.owner_id, project_id=project.id)
    assert space.agent_cache.ids() == {str(a.id) for a in (kept, renamed, dropped)}

    # Writes straight to the database: nothing tells the workspace.
    renamed.system_prompt = "changed behind the cache's back"
    renamed.save()
    Agent.objects.filter(id=dropped.id).delete()
    added = Agent.objects.create(project=project, name="added later", model="m")
    assert space.agent_cache.peek(renamed.id)["system_prompt"] != renamed.system_prompt

    space.revalidate_at = 0  # the revalidation interval has passed
    space = get_worker_space(user_id=project.owner_id, project_id=project.id)

    assert space.agent_cache.peek(renamed.id)["system_prompt"] == renamed.system_prompt
    assert space.agent_cache.ids() == {str(kept.id), str(renamed.id), str(added.id)}
    assert space.agent_ids == {str(kept.id), str(renamed.id), str(added.id)}


@pytest.mark.django_db(transaction=True)
def test_revalidation_of_an_unchanged_workspace_writes_nothing(project, agent, redis_client):
    space = get_worker_space(user_id=project.owner_id, project_id=project.id)
    before = space.agent_cache.all()
    key = space.redis.key("agents")
    dump = redis_client.execute_command("DUMP", key, NEVER_DECODE=True)
    space.revalidate_at = 0
    get_worker_space(user_id=project.owner_id, project_id=project.id)
    assert space.agent_cache.all() == before
    assert redis_client.execute_command("DUMP", key, NEVER_DECODE=True) == dump
