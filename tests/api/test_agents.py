import pytest

from agents.models import Agent
from tests.factories import AgentFactory, ProjectFactory

pytestmark = pytest.mark.django_db


def agents_url(project, agent_id=None):
    base = f"/my/projects/{project.id}/agents/"
    return f"{base}{agent_id}/" if agent_id else base


def test_create_list_get_update_delete(api, project):
    payload = {
        "name": "researcher",
        "system_prompt": "You research.",
        "model": "gpt-4o-mini",
        "params": {"temperature": 0.3, "max_tokens": 256, "top_k": 4, "custom": "kept"},
    }
    created = api.post(agents_url(project), payload, format="json")
    assert created.status_code == 201, created.content
    agent = created.json()
    assert {k: agent[k] for k in payload} == payload
    assert agent["project_id"] == str(project.id)

    listing = api.get(agents_url(project)).json()
    assert listing["total"] == 1 and listing["agents"][0]["id"] == agent["id"]

    patched = api.patch(agents_url(project, agent["id"]), {"model": "other"}, format="json")
    assert patched.status_code == 200 and patched.json()["model"] == "other"
    assert api.get(agents_url(project, agent["id"])).json()["model"] == "other"

    assert api.delete(agents_url(project, agent["id"])).status_code == 204
    assert api.get(agents_url(project, agent["id"])).status_code == 404
    assert not Agent.objects.filter(id=agent["id"]).exists()


def test_names_are_unique_within_a_project_only(api, project, user):
    AgentFactory(project=project, name="writer")
    response = api.post(agents_url(project), {"name": "writer"}, format="json")
    assert response.status_code == 409 and "name" in response.json()
    assert response.json()["code"] == "conflict"
    assert Agent.objects.filter(project=project).count() == 1

    other = ProjectFactory(owner=user)
    assert api.post(agents_url(other), {"name": "writer"}, format="json").status_code == 201


def test_renaming_onto_a_taken_name_is_409_and_changes_nothing(api, project):
    AgentFactory(project=project, name="a")
    b = AgentFactory(project=project, name="b")
    response = api.patch(agents_url(project, b.id), {"name": "a"}, format="json")
    assert response.status_code == 409 and "name" in response.json()
    b.refresh_from_db()
    assert b.name == "b"


BIG = "x" * (32 * 1024 + 1)


@pytest.mark.parametrize(
    "payload, field",
    [
        ({}, "name"),
        ({"name": "n" * 201}, "name"),
        ({"name": "a", "system_prompt": BIG}, "system_prompt"),
        # 32 KiB is counted in bytes: 11,000 three-byte characters exceed it.
        ({"name": "a", "system_prompt": "€" * 11000}, "system_prompt"),
        ({"name": "a", "model": "m" * 201}, "model"),
        ({"name": "a", "params": []}, "params"),
        ({"name": "a", "params": "temperature=1"}, "params"),
        ({"name": "a", "params": {"temperature": 3}}, "params"),
        ({"name": "a", "params": {"temperature": "hot"}}, "params"),
        ({"name": "a", "params": {"max_tokens": 0}}, "params"),
        ({"name": "a", "params": {"top_k": 1.5}}, "params"),
        ({"name": "a", "params": {"top_k": True}}, "params"),
        ({"name": "a", "params": {"blob": "x" * 9000}}, "params"),
        ({"name": "a", "colour": "red"}, "colour"),
    ],
)
def test_invalid_agent_is_400_naming_the_field_and_writes_nothing(api, project, payload, field):
    response = api.post(agents_url(project), payload, format="json")
    assert response.status_code == 400, response.content
    assert field in response.json()
    assert Agent.objects.count() == 0


def test_invalid_update_changes_nothing(api, agent):
    before = (agent.name, agent.params, agent.updated_at)
    response = api.patch(
        agents_url(agent.project, agent.id),
        {"name": "fine", "params": {"temperature": -1}},
        format="json",
    )
    assert response.status_code == 400 and "params" in response.json()
    agent.refresh_from_db()
    assert (agent.name, agent.params, agent.updated_at) == before
