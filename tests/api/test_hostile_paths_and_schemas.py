"""Hostile input that reached a 500 or a run's RecursionError: NUL and other invalid
path segments, recursive or over-deep tool parameter schemas; and a project API key
cannot delete its project."""

from __future__ import annotations

import pytest
from django.core.exceptions import ValidationError

from agents.models import ProjectSecret, Tool
from agents.tool_validation import validate_parameters_schema
from projects.models import Project
from tests.governance.conftest import key_client

pytestmark = pytest.mark.django_db


def secrets_url(project, name):
    return f"/my/projects/{project.id}/secrets/{name}/"


@pytest.mark.parametrize("segment", ["%00", "a%00b", "%01", "%7F", "%0A"])
def test_control_characters_in_the_path_are_400(api, project, segment):
    response = api.put(secrets_url(project, segment), {"value": "x"}, format="json")
    assert response.status_code == 400, response.content[:300]
    assert response.json()["code"] == "invalid"
    # A route whose parameter is an id does not match it: the usual 404.
    assert api.get(f"/my/projects/{project.id}/agents/{segment}/").status_code == 404
    assert not ProjectSecret.objects.exists()


@pytest.mark.parametrize("name", ["not a name", "9starts-with-digit", "x" * 65, "dash-ed"])
def test_a_secret_name_no_secret_can_have_is_400(api, project, name):
    response = api.put(secrets_url(project, name), {"value": "x"}, format="json")
    assert response.status_code == 400, response.content[:300]
    assert "name" in response.json()
    assert api.delete(secrets_url(project, name)).status_code == 400
    assert not ProjectSecret.objects.exists()


def test_another_users_project_is_still_404_whatever_the_name(other_api, project):
    assert other_api.put(secrets_url(project, "%20"), {"value": "x"}).status_code == 404


def _deep(levels: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


def _tool(parameters):
    return {
        "kind": "http",
        "name": "t",
        "description": "",
        "parameters": parameters,
        "method": "POST",
        "url_template": "https://api.example.com/t",
    }


@pytest.mark.parametrize(
    "parameters",
    [
        {"type": "object", "$ref": "#"},  # the root refers to itself
        {"type": "object", "properties": {"a": {"$ref": "#"}}},
        {
            "type": "object",
            "properties": {"a": {"$ref": "#/$defs/x"}},
            "$defs": {"x": {"$ref": "#/$defs/y"}, "y": {"allOf": [{"$ref": "#/$defs/x"}]}},
        },
        {
            "type": "object",
            "properties": {"a": {"$ref": "#/$defs/node"}},
            "$defs": {"node": {"type": "object", "properties": {"kid": {"$ref": "#/$defs/node"}}}},
        },
        {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}},
        {"type": "object", "properties": {"a": {"$ref": "http://169.254.169.254/s"}}},
        {"type": "object", "$dynamicRef": "#meta"},
        _deep(40),
    ],
)
def test_recursive_or_over_deep_tool_schemas_are_400_at_creation(api, agent, parameters):
    url = f"/my/projects/{agent.project_id}/agents/{agent.id}/tools/"
    response = api.post(url, _tool(parameters), format="json")
    assert response.status_code == 400, response.content[:300]
    assert "parameters" in response.json()
    assert not Tool.objects.exists()


def test_a_schema_with_plain_definitions_is_accepted(api, agent):
    parameters = {
        "type": "object",
        "properties": {"a": {"$ref": "#/$defs/city"}, "b": {"$ref": "#/$defs/city"}},
        "$defs": {"city": {"type": "string"}},
    }
    url = f"/my/projects/{agent.project_id}/agents/{agent.id}/tools/"
    assert api.post(url, _tool(parameters), format="json").status_code == 201
    assert api.post(url, {**_tool(_deep(12)), "name": "deep"}, format="json").status_code == 201


def test_the_validator_refuses_over_deep_schemas_the_admin_would_pass_it():
    """The API's parser already refuses bodies nested past 32 levels; the admin's form
    reaches the validator with any depth."""
    with pytest.raises(ValidationError, match="deeper"):
        validate_parameters_schema(_deep(40))
    validate_parameters_schema(_deep(12))


def test_a_project_key_cannot_delete_its_project_the_owner_can(api, project):
    created = api.post(
        f"/my/projects/{project.id}/keys/",
        {"name": "ci", "scopes": ["read", "write", "chat"]},
        format="json",
    )
    assert created.status_code == 201, created.content
    raw = created.json()["key"]
    refused = key_client(raw).delete(f"/my/projects/{project.id}/")
    assert refused.status_code == 403, refused.content
    assert Project.objects.filter(id=project.id).exists()
    assert api.delete(f"/my/projects/{project.id}/").status_code == 204
