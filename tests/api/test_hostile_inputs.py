"""Inputs that once crashed the API (a 500, or a stream that died later) are a 400 that
names the field, and write nothing."""

from __future__ import annotations

import json

import httpx
import pytest
from rest_framework.test import APIClient

from agents.models import Agent
from chat.models import ChatSession, Message
from projects.models import Project
from tests.factories import ChatSessionFactory
from tests.runtime.conftest import queued_task_names

pytestmark = pytest.mark.django_db

DEEP = 5000


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def post_raw(client: APIClient, url: str, body: str):
    return client.post(url, body, content_type="application/json")


def snapshot():
    return (
        Project.objects.count(),
        Agent.objects.count(),
        ChatSession.objects.count(),
        Message.objects.count(),
    )


def assert_400_naming(response, field: str) -> dict:
    assert response.status_code == 400, response.content[:300]
    body = response.json()
    assert field in body, body
    assert body["code"] == "invalid" and field in body["detail"]
    return body


@pytest.mark.parametrize("depth", [33, 1000, DEEP, 100_000])
def test_deeply_nested_json_is_400_naming_the_field(api, project, depth):
    before = snapshot()
    body = '{"name": "deep", "params": {"x": ' + nested(depth) + "}}"
    response = post_raw(api, f"/my/projects/{project.id}/agents/", body)
    assert_400_naming(response, "params")
    assert "Nested deeper than" in response.json()["params"][0]
    assert snapshot() == before


def test_nesting_within_the_limit_is_accepted(api, project):
    body = '{"name": "shallow", "params": {"x": ' + nested(20) + "}}"
    response = post_raw(api, f"/my/projects/{project.id}/agents/", body)
    assert response.status_code == 201, response.content


def test_deeply_nested_json_on_the_token_endpoint_without_credentials(user):
    body = '{"username": ' + nested(DEEP) + ', "password": "x"}'
    response = post_raw(APIClient(), "/auth/token/", body)
    assert_400_naming(response, "username")


def test_a_deeply_nested_body_root_is_a_parse_error(api):
    response = post_raw(api, "/my/projects/", nested(DEEP))
    assert response.status_code == 400
    assert response.json()["code"] == "parse_error"
    assert Project.objects.count() == 0


def test_nul_in_params_is_400(api, project):
    response = api.post(
        f"/my/projects/{project.id}/agents/",
        {"name": "a", "params": {"note": "a\x00b"}},
        format="json",
    )
    assert_400_naming(response, "params")
    assert "Null characters" in response.json()["params"][0]
    assert not Agent.objects.exists()


@pytest.mark.parametrize("number", ["1e309", "-1e400"])
def test_a_number_too_large_for_a_float_is_400_and_queues_nothing(api, project, number):
    """1e309 parses as infinity, which nothing downstream can hold (the vector store
    failed the whole ingest job on it, after a 202)."""
    agent = Agent.objects.create(project=project, name="a")
    url = f"/my/projects/{project.id}/agents/{agent.id}/context/"
    body = (
        '{"documents": ["The office cat is called Barsik.", '
        '{"text": "Invoices are paid on the fifth.", "metadata": {"n": ' + number + "}}]}"
    )
    response = post_raw(api, url, body)
    assert_400_naming(response, "documents")
    assert "64-bit float" in response.json()["documents"][0]
    assert queued_task_names(project.id) == []  # no ingest was queued


def test_nul_in_a_params_key_is_400(api, project):
    body = '{"name": "a", "params": {"a\\u0000": 1}}'
    assert_400_naming(post_raw(api, f"/my/projects/{project.id}/agents/", body), "params")


@pytest.mark.parametrize(
    "path, field, body",
    [
        ("agents/", "system_prompt", '{"name": "a", "system_prompt": "x\\ud800y"}'),
        ("agents/", "params", '{"name": "a", "params": {"k": "\\udfff"}}'),
        ("agents/", "name", '{"name": "\\ud800"}'),
        ("chat/{s}/messages/", "content", '{"content": "hi \\ud800"}'),
        ("agents/{a}/context/", "documents", '{"documents": ["ok", "\\ud800"]}'),
        (
            "agents/{a}/context/",
            "documents",
            '{"documents": [{"text": "ok", "metadata": {"m": "\\udc00"}}]}',
        ),
    ],
)
def test_lone_surrogates_are_400_naming_the_field(api, session, path, field, body):
    before = snapshot()
    base = f"/my/projects/{session.project_id}/"
    url = base + path.format(s=session.id, a=session.agent_id)
    body_json = assert_400_naming(post_raw(api, url, body), field)
    assert "surrogate" in body_json[field][0]
    assert snapshot() == before


def test_a_surrogate_in_a_key_is_named_escaped(api, project):
    response = post_raw(api, f"/my/projects/{project.id}/agents/", '{"\\ud800": 1, "name": "a"}')
    assert response.status_code == 400
    assert "\\ud800" in response.json()  # valid UTF-8: the key comes back escaped


def test_a_surrogate_pair_is_fine(api, project):
    response = post_raw(api, f"/my/projects/{project.id}/agents/", '{"name": "\\ud83d\\ude00"}')
    assert response.status_code == 201 and response.json()["name"] == "😀"


@pytest.mark.parametrize(
    "url",
    [
        "/my/projects/",
        "/my/projects/{p}/agents/",
        "/my/projects/{p}/chat/",
        "/my/projects/{p}/chat/{s}/messages/",
        "/admin/workspaces/stats",
    ],
)
@pytest.mark.parametrize("value", ["99999999999999999999", "-1", "1e3", "\x00"])
def test_out_of_range_offset_is_400_naming_it(user, session, url, value):
    user.is_staff = True
    user.save()
    client = APIClient()
    client.force_authenticate(user)
    session.project.owner = user
    session.project.save()
    response = client.get(url.format(p=session.project_id, s=session.id), {"offset": value})
    assert_400_naming(response, "offset")


def test_nul_in_query_parameters_is_400(api, session):
    url = f"/my/projects/{session.project_id}/agents/{session.agent_id}/context/"
    assert_400_naming(api.get(url, {"q": "a\x00b"}), "q")


def test_oversized_body_is_413_and_writes_nothing(api, project, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    body = json.dumps({"name": "big", "description": "x" * 2000})
    response = post_raw(api, "/my/projects/", body)
    assert response.status_code == 413
    assert response.json()["code"] == "payload_too_large"
    assert Project.objects.count() == 1  # the fixture's


def test_oversized_form_body_on_the_token_endpoint_is_413(user, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    response = APIClient().post(
        "/auth/token/", f"username={user.username}&password={'x' * 2000}",
        content_type="application/x-www-form-urlencoded",
    )  # fmt: skip
    assert response.status_code == 413 and response.json()["code"] == "payload_too_large"


@pytest.mark.slow
@pytest.mark.parametrize(
    "params, headers, field",
    [
        ({"cursor": "9" * 20}, {}, "cursor"),
        ({"cursor": "1-" + "9" * 20}, {}, "cursor"),
        ({"cursor": "yesterday"}, {}, "cursor"),
        ({}, {"Last-Event-ID": "18446744073709551616-0"}, "Last-Event-ID"),
    ],
)
def test_an_out_of_range_cursor_is_400_before_the_stream_starts(
    asgi_server, token_user, params, headers, field
):
    user, token = token_user
    session = ChatSessionFactory(agent__project__owner=user)
    url = f"{asgi_server.url}/my/projects/{session.project_id}/chat/{session.id}/events/"
    response = httpx.get(
        url, params=params, headers={"Authorization": f"Token {token}", **headers}, timeout=10
    )
    assert response.status_code == 400
    assert response.json()[field] and field in response.json()["detail"]


@pytest.mark.slow
def test_the_largest_cursor_is_accepted(asgi_server, token_user):
    user, token = token_user
    session = ChatSessionFactory(agent__project__owner=user)
    url = f"{asgi_server.url}/my/projects/{session.project_id}/chat/{session.id}/events/"
    cursor = f"{2**64 - 1}-{2**64 - 1}"
    with httpx.stream(
        "GET", url, params={"cursor": cursor}, headers={"Authorization": f"Token {token}"}
    ) as response:
        assert response.status_code == 200
        assert next(response.iter_lines()).startswith("retry:")
