"""Agent create/update/delete through the API keep the AgentCache and bus registration
in step (after commit)."""

from __future__ import annotations

import pytest

from agents.services import agent_create
from tests.factories import ProjectFactory
from tests.workspaces.conftest import keys_under
from workspaces.bus import get_agent_bus
from workspaces.manager import get_worker_space
from workspaces.signals import agent_deregistered, agents_registered


@pytest.fixture
def signals():
    seen = []

    def on_registered(sender, **kwargs):
        seen.append(("registered", kwargs["agent_ids"]))

    def on_deregistered(sender, **kwargs):
        seen.append(("deregistered", kwargs["agent_id"]))

    agents_registered.connect(on_registered)
    agent_deregistered.connect(on_deregistered)
    yield seen
    agents_registered.disconnect(on_registered)
    agent_deregistered.disconnect(on_deregistered)


def registered(project) -> set[str]:
    return get_agent_bus().registered_agents(user_id=project.owner_id, project_id=project.id)


@pytest.mark.django_db(transaction=True)
def test_create_update_delete_through_the_api(api, project, signals):
    url = f"/my/projects/{project.id}/agents/"
    assert api.get(url).status_code == 200  # initialises the workspace (no agents)
    space = get_worker_space(user_id=project.owner_id, project_id=project.id)
    assert space.agent_cache.ids() == set() and registered(project) == set()

    created = api.post(url, {"name": "scout", "system_prompt": "Look."}, format="json")
    assert created.status_code == 201
    agent_id = created.json()["id"]
    assert space.agent_cache.peek(agent_id)["system_prompt"] == "Look."
    assert registered(project) == {agent_id}
    assert ("registered", [agent_id]) in signals

    patched = api.patch(f"{url}{agent_id}/", {"system_prompt": "Look closer."}, format="json")
    assert patched.status_code == 200
    assert space.agent_cache.peek(agent_id)["system_prompt"] == "Look closer."
    assert registered(project) == {agent_id}

    assert api.delete(f"{url}{agent_id}/").status_code == 204
    assert space.agent_cache.peek(agent_id) is None
    assert registered(project) == set()
    assert signals[-1] == ("deregistered", agent_id)


@pytest.mark.django_db(transaction=True)
def test_a_rejected_agent_write_changes_nothing_in_the_workspace(api, project, signals):
    url = f"/my/projects/{project.id}/agents/"
    api.get(url)
    space = get_worker_space(user_id=project.owner_id, project_id=project.id)
    before = space.agent_cache.all()

    response = api.post(url, {"name": "x" * 201}, format="json")

    assert response.status_code == 400 and "name" in response.json()
    assert space.agent_cache.all() == before and registered(project) == set()
    assert signals == []


@pytest.mark.django_db(transaction=True)
def test_an_agent_created_before_the_workspace_exists_is_loaded_by_initialisation(user):
    project = ProjectFactory(owner=user)
    agent = agent_create(project=project, name="early")
    # No workspace yet: the write left Redis alone.
    assert not keys_under(user.pk, project.id)

    space = get_worker_space(user_id=user.pk, project_id=project.id)
    assert space.agent_cache.ids() == {str(agent.id)} == registered(project)


@pytest.mark.django_db(transaction=False)
def test_nothing_reaches_the_workspace_if_the_transaction_rolls_back(api, project):
    url = f"/my/projects/{project.id}/agents/"
    api.get(url)
    space = get_worker_space(user_id=project.owner_id, project_id=project.id)
    # The `db` fixture's transaction never commits: on-commit hooks never run.
    agent_create(project=project, name="uncommitted")
    assert space.agent_cache.ids() == set() and registered(project) == set()


@pytest.mark.django_db(transaction=True)
def test_agent_writes_the_cache_missed_are_healed_at_revalidation(project, signals, settings):
    """A write whose after-commit sync never reached Redis (Redis down at that moment, or
    a write that bypassed the services) is noticed by the next revalidation and synced
    from the database: cache, bus registration and the collection signals."""
    from agents.models import Agent
    from tests.factories import AgentFactory

    kept, renamed, dropped = (AgentFactory(project=project) for _ in range(3))
    space = get_worker_space(user_id=project.owner_id, project_id=project.id)
    assert space.agent_cache.ids() == {str(a.id) for a in (kept, renamed, dropped)}
    signals.clear()

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
    assert registered(project) == {str(kept.id), str(renamed.id), str(added.id)}
    assert ("deregistered", str(dropped.id)) in signals
    assert ("registered", [str(added.id)]) in signals


@pytest.mark.django_db(transaction=True)
def test_revalidation_of_an_unchanged_workspace_writes_nothing(project, agent, signals):
    space = get_worker_space(user_id=project.owner_id, project_id=project.id)
    before = space.agent_cache.all()
    signals.clear()
    space.revalidate_at = 0
    get_worker_space(user_id=project.owner_id, project_id=project.id)
    assert space.agent_cache.all() == before
    assert signals == []
