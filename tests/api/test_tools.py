"""Tools of an agent and secrets of a project through the API (and the admin): created,
validated as a whole, never echoing a secret; bad input is a 400 that writes nothing."""

import pytest

from agents.models import ProjectSecret, Tool
from tests.factories import AgentFactory

pytestmark = pytest.mark.django_db

WEATHER = {
    "kind": "http",
    "name": "weather",
    "description": "The weather of a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
        "required": ["city"],
    },
    "method": "GET",
    "url_template": "https://api.example.com/weather/{city}",
    "headers": {"Authorization": "Bearer {{secret:WEATHER_KEY}}"},
}


def tools_url(agent, tool_id=None):
    base = f"/my/projects/{agent.project_id}/agents/{agent.id}/tools/"
    return f"{base}{tool_id}/" if tool_id else base


def secrets_url(project, name=None):
    base = f"/my/projects/{project.id}/secrets/"
    return f"{base}{name}/" if name else base


def test_http_tool_create_list_get_update_delete(api, agent):
    created = api.post(tools_url(agent), WEATHER, format="json")
    assert created.status_code == 201, created.content
    tool = created.json()
    assert {k: tool[k] for k in WEATHER} == WEATHER
    assert tool["safe_to_repeat"] is True  # a GET, unless said otherwise
    assert tool["timeout_seconds"] is None

    listing = api.get(tools_url(agent)).json()
    assert listing["total"] == 1 and listing["tools"][0]["id"] == tool["id"]

    patched = api.patch(
        tools_url(agent, tool["id"]), {"timeout_seconds": 2.5, "safe_to_repeat": False},
        format="json",
    )  # fmt: skip
    assert patched.status_code == 200, patched.content
    assert patched.json()["timeout_seconds"] == 2.5 and patched.json()["safe_to_repeat"] is False

    assert api.delete(tools_url(agent, tool["id"])).status_code == 204
    assert api.get(tools_url(agent, tool["id"])).status_code == 404
    assert not Tool.objects.exists()


def test_builtin_tool_shows_the_schema_the_model_gets(api, agent):
    created = api.post(
        tools_url(agent), {"kind": "builtin", "name": "search_context"}, format="json"
    )
    assert created.status_code == 201, created.content
    tool = created.json()
    assert tool["parameters"]["required"] == ["query"]
    assert tool["description"] and tool["safe_to_repeat"] is True


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"kind": "builtin", "name": "launch_rockets"}, "name"),
        ({"kind": "builtin", "name": "search_context", "method": "GET"}, "method"),
        ({"name": "bad name!"}, "name"),
        ({"kind": "ftp"}, "kind"),
        ({"method": "TRACE"}, "method"),
        ({"method": None}, "method"),
        ({"url_template": "ftp://example.com/{city}"}, "url_template"),
        ({"url_template": "https://{city}.example.com/"}, "url_template"),
        ({"url_template": "https://user:pw@example.com/{city}"}, "url_template"),
        ({"url_template": "https://example.com/{missing}"}, "url_template"),
        ({"url_template": "https://example.com/{city!r}"}, "url_template"),
        (
            {"parameters": {"type": "object", "properties": {"city": {"type": "strin"}}}},
            "parameters",
        ),
        ({"parameters": {"type": "array"}}, "parameters"),
        ({"parameters": ["not", "an", "object"]}, "parameters"),
        ({"headers": {"Bad Header": "x"}}, "headers"),
        ({"headers": {"Host": "evil.example"}}, "headers"),
        ({"headers": {"X-A": "a\r\nX-Injected: 1"}}, "headers"),
        ({"headers": {"X-A": "{{secret:not-a-name}}"}}, "headers"),
        ({"headers": {"X-A": 5}}, "headers"),
        ({"safe_to_repeat": "yes"}, "safe_to_repeat"),
        ({"timeout_seconds": "5"}, "timeout_seconds"),
        ({"timeout_seconds": 0}, "timeout_seconds"),
        ({"timeout_seconds": 1000}, "timeout_seconds"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_bad_tools_are_400_naming_the_field_and_write_nothing(api, agent, change, field):
    response = api.post(tools_url(agent), {**WEATHER, **change}, format="json")
    assert response.status_code == 400, response.content
    body = response.json()
    assert body["code"] == "invalid" and field in body, body
    assert not Tool.objects.exists()


def test_a_partial_update_keeps_the_tool_valid_as_a_whole(api, agent):
    tool = api.post(tools_url(agent), WEATHER, format="json").json()
    response = api.patch(
        tools_url(agent, tool["id"]), {"url_template": "https://e.com/{nope}"}, format="json"
    )
    assert response.status_code == 400 and "url_template" in response.json()
    assert Tool.objects.get().url_template == WEATHER["url_template"]


def test_tool_names_are_unique_per_agent(api, agent):
    assert api.post(tools_url(agent), WEATHER, format="json").status_code == 201
    again = api.post(tools_url(agent), WEATHER, format="json")
    assert again.status_code == 409 and again.json()["code"] == "conflict"
    other = AgentFactory(project=agent.project)
    assert api.post(tools_url(other), WEATHER, format="json").status_code == 201


def test_a_tool_of_another_agent_is_404(api, agent):
    other = AgentFactory(project=agent.project)
    tool = api.post(tools_url(other), WEATHER, format="json").json()
    assert api.get(tools_url(agent, tool["id"])).status_code == 404
    assert api.delete(tools_url(agent, tool["id"])).status_code == 404
    assert Tool.objects.filter(id=tool["id"]).exists()


def test_secrets_are_write_only(api, project):
    created = api.post(
        secrets_url(project), {"name": "WEATHER_KEY", "value": "s3cr3t-value"}, format="json"
    )
    assert created.status_code == 201, created.content
    assert "s3cr3t-value" not in created.content.decode()
    assert set(created.json()) == {"name", "created_at", "updated_at"}

    listing = api.get(secrets_url(project))
    assert listing.json()["secrets"][0]["name"] == "WEATHER_KEY"
    assert "s3cr3t-value" not in listing.content.decode()

    replaced = api.put(secrets_url(project, "WEATHER_KEY"), {"value": "n3w-value"}, format="json")
    assert replaced.status_code == 200 and "n3w-value" not in replaced.content.decode()
    assert ProjectSecret.objects.get().value == "n3w-value"

    duplicate = api.post(secrets_url(project), {"name": "WEATHER_KEY", "value": "x"}, format="json")
    assert duplicate.status_code == 409
    assert api.delete(secrets_url(project, "WEATHER_KEY")).status_code == 204
    assert (
        api.put(secrets_url(project, "WEATHER_KEY"), {"value": "x"}, format="json").status_code
        == 404
    )
    assert not ProjectSecret.objects.exists()


@pytest.mark.parametrize(
    "body",
    [
        {"name": "1BAD", "value": "x"},
        {"name": "has-dash", "value": "x"},
        {"name": "OK"},
        {"name": "OK", "value": ""},
        {"name": "OK", "value": 5},
        {"name": "OK", "value": "x" * 5000},
        {"name": "OK", "value": "x", "extra": 1},
    ],
)
def test_bad_secrets_are_400_and_write_nothing(api, project, body):
    response = api.post(secrets_url(project), body, format="json")
    assert response.status_code == 400, response.content
    assert response.json()["code"] == "invalid"
    assert not ProjectSecret.objects.exists()


def test_admin_validates_tools_as_the_api_does(admin_client, agent):
    url = "/admin/agents/tool/add/"
    form = {
        "agent": str(agent.id),
        "kind": "http",
        "name": "weather",
        "description": "",
        "parameters": '{"type": "object", "properties": {"city": {"type": "string"}}}',
        "method": "GET",
        "url_template": "https://api.example.com/{nope}",
        "headers": "{}",
    }
    response = admin_client.post(url, form)
    assert response.status_code == 200 and not Tool.objects.exists()
    assert "Placeholders not among" in response.content.decode()
    form["url_template"] = "https://api.example.com/{city}"
    assert admin_client.post(url, form).status_code == 302
    assert Tool.objects.get().name == "weather"


def test_admin_never_shows_a_secret(admin_client, project):
    secret = ProjectSecret.objects.create(project=project, name="KEY", value="hidden-value-123")
    page = admin_client.get(f"/admin/agents/projectsecret/{secret.id}/change/")
    assert page.status_code == 200 and "hidden-value-123" not in page.content.decode()
    kept = admin_client.post(
        f"/admin/agents/projectsecret/{secret.id}/change/",
        {"project": str(project.id), "name": "KEY", "value": ""},
    )
    assert kept.status_code == 302
    assert ProjectSecret.objects.get().value == "hidden-value-123"
