"""Rate limits answer 429 with Retry-After, before anything is written."""

from __future__ import annotations

import pytest
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from chat.models import Message
from tests.factories import AgentFactory, ChatSessionFactory

pytestmark = pytest.mark.django_db(transaction=True)


def test_messages_per_user_are_limited_and_the_refused_one_writes_nothing(api, session, rates):
    rates(messages_user="3/min")
    url = f"/my/projects/{session.project_id}/chat/{session.id}/messages/"
    codes = [api.post(url, {"content": f"m{i}"}, format="json").status_code for i in range(4)]
    assert codes == [202, 202, 202, 429]
    refused = api.post(url, {"content": "one more"}, format="json")
    assert refused.status_code == 429 and int(refused["Retry-After"]) > 0
    assert Message.objects.filter(session=session, role="user").count() == 3
    # Reading is not limited.
    assert api.get(url).status_code == 200


def test_messages_per_project_are_limited_across_its_sessions(api, project, rates):
    rates(messages_project="2/min")
    agent = AgentFactory(project=project)
    sessions = [ChatSessionFactory(agent=agent, project=project) for _ in range(3)]
    codes = [
        api.post(
            f"/my/projects/{project.id}/chat/{s.id}/messages/", {"content": "hi"}, format="json"
        ).status_code
        for s in sessions
    ]
    assert codes == [202, 202, 429]


def test_a_projects_key_and_its_owner_share_the_projects_limit(api, project, rates):
    """Every credential of a project acts as its owner: one project limit for all."""
    rates(messages_project="2/min", messages_user="100/min")
    session = ChatSessionFactory(agent=AgentFactory(project=project), project=project)
    url = f"/my/projects/{project.id}/chat/{session.id}/messages/"
    key = api.post(
        f"/my/projects/{project.id}/keys/", {"name": "k", "scopes": ["chat"]}, format="json"
    ).json()["key"]
    by_key = APIClient()
    by_key.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    codes = [
        client.post(url, {"content": "hi"}, format="json").status_code
        for client in (api, by_key, api, by_key)
    ]
    assert codes == [202, 202, 429, 429]


def test_a_stranger_cannot_spend_a_projects_limit(api, other_api, session, rates):
    """Another user's project is a 404, and it costs its owner nothing: anyone who knows
    a project's id could otherwise keep its owner at 429."""
    rates(messages_project="3/min", messages_user="1000/min")
    url = f"/my/projects/{session.project_id}/chat/{session.id}/messages/"
    for _ in range(3):  # as many as the limit: each one a 404, counted as theirs
        assert other_api.post(url, {"content": "x"}, format="json").status_code == 404
    codes = [api.post(url, {"content": f"m{i}"}, format="json").status_code for i in range(4)]
    assert codes == [202, 202, 202, 429]


def test_a_stranger_cannot_spend_a_projects_search_limit(api, other_api, agent, rates, settings):
    """The same through the waiting search route (realtime.auth throttles as the view
    would, before it reads the project)."""
    settings.CONTEXT_SEARCH_TIMEOUT_SECONDS = 0.5  # no worker answers here: 503 is fine
    rates(searches_project="2/min", searches_user="1000/min")
    url = f"/my/projects/{agent.project_id}/agents/{agent.id}/context/?q=hello"
    for _ in range(2):
        assert other_api.get(url).status_code == 404
    codes = [api.get(url).status_code for _ in range(3)]
    assert 429 not in codes[:2] and codes[2] == 429


def test_a_request_refused_by_one_limit_takes_nothing_from_the_others(api, project, rates):
    """The user's and the project's limits are checked together: a message the user's
    limit refuses uses none of the project's."""
    rates(messages_user="2/min", messages_project="3/min")
    session = ChatSessionFactory(agent=AgentFactory(project=project), project=project)
    url = f"/my/projects/{project.id}/chat/{session.id}/messages/"
    codes = [api.post(url, {"content": f"m{i}"}, format="json").status_code for i in range(4)]
    assert codes == [202, 202, 429, 429]
    rates(messages_user="100/min", messages_project="3/min")
    codes = [api.post(url, {"content": f"n{i}"}, format="json").status_code for i in range(2)]
    assert codes == [202, 429]  # the project had one left, not none
    assert Message.objects.filter(session=session, role="user").count() == 3


def test_a_zero_rate_refuses_everything_with_retry_after(api, session, rates):
    rates(messages_project="0/min")
    url = f"/my/projects/{session.project_id}/chat/{session.id}/messages/"
    refused = api.post(url, {"content": "hi"}, format="json")
    assert refused.status_code == 429 and int(refused["Retry-After"]) > 0
    assert not Message.objects.filter(session=session).exists()


def test_ingests_are_limited(api, agent, rates):
    rates(ingests_user="1/min")
    url = f"/my/projects/{agent.project_id}/agents/{agent.id}/context/"
    assert api.post(url, {"documents": ["a"]}, format="json").status_code == 202
    refused = api.post(url, {"documents": ["b"]}, format="json")
    assert refused.status_code == 429 and refused["Retry-After"]


def test_searches_are_limited(api, agent, rates, settings):
    settings.CONTEXT_SEARCH_TIMEOUT_SECONDS = 0.2  # no worker: each search times out
    rates(searches_user="2/min")
    url = f"/my/projects/{agent.project_id}/agents/{agent.id}/context/"
    codes = [api.get(url, {"q": "x"}).status_code for _ in range(3)]
    assert codes == [503, 503, 429]


def test_token_clients_are_not_asked_for_a_csrf_token(user, agent):
    """Every route behaves as DRF's views do for CSRF: a token client has no cookie."""
    client = APIClient(enforce_csrf_checks=True)
    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.get_or_create(user=user)[0].key}")
    url = f"/my/projects/{agent.project_id}/agents/{agent.id}/context/"
    assert client.post(url, {"documents": ["a"]}, format="json").status_code == 202
    assert client.delete(url).status_code == 202


def test_password_guessing_is_limited_per_username_even_with_the_right_password(
    client, user, rates
):
    rates(login_username="3/min")
    user.set_password("right")
    user.save()
    codes = [
        client.post(
            "/auth/token/",
            {"username": user.username, "password": password},
            content_type="application/json",
        ).status_code
        for password in ("wrong1", "wrong2", "wrong3", "right")
    ]
    assert codes == [401, 401, 401, 429]
    # A body that is not an object is the view's 400, not the throttle's crash.
    assert client.post("/auth/token/", [None], content_type="application/json").status_code == 400
    # Another username from the same address is not held up by it.
    assert (
        client.post(
            "/auth/token/",
            {"username": "someone-else", "password": "x"},
            content_type="application/json",
        ).status_code
        == 401
    )


def test_the_schema_documents_429_where_requests_are_limited(client):
    paths = client.get("/api/schema/", {"format": "json"}).json()["paths"]
    context = paths["/my/projects/{project_id}/agents/{agent_id}/context/"]
    assert "429" in context["get"]["responses"] and "429" in context["post"]["responses"]
    assert "429" not in context["delete"]["responses"]
    assert "429" in paths["/auth/token/"]["post"]["responses"]
    assert "429" not in paths["/my/projects/"]["get"]["responses"]


def _login(client, username, password, **extra):
    return client.post(
        "/auth/token/",
        {"username": username, "password": password},
        content_type="application/json",
        **extra,
    ).status_code


def test_a_forged_forwarded_for_does_not_escape_the_per_address_limit(client, user, rates):
    """No trusted proxy (the default): X-Forwarded-For is not the client's address."""
    rates(login_address="5/min", login_username="1000/min")
    codes = [
        _login(client, user.username, "wrong", HTTP_X_FORWARDED_FOR=f"203.0.113.{i}")
        for i in range(12)
    ]
    assert codes[:5] == [401] * 5 and set(codes[5:]) == {429}


def test_behind_a_trusted_proxy_the_forwarded_client_is_limited(client, user, rates, settings):
    rates(login_address="2/min", login_username="1000/min")
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "NUM_PROXIES": 1}
    # The proxy appends the peer it saw; what the client wrote before it is not believed.
    first = [
        _login(client, "u", "p", HTTP_X_FORWARDED_FOR=f"1.1.1.{i}, 198.51.100.7") for i in range(3)
    ]
    assert first == [401, 401, 429]
    assert _login(client, "u", "p", HTTP_X_FORWARDED_FOR="198.51.100.8") == 401


def test_nobody_can_lock_a_user_out_from_elsewhere(client, user, rates):
    rates(login_username="3/min", login_address="1000/min")
    user.set_password("right")
    user.save()
    guesses = [_login(client, user.username, "wrong", REMOTE_ADDR="192.0.2.66") for _ in range(6)]
    assert guesses[-1] == 429  # the guesser is held up...
    assert _login(client, user.username, "right", REMOTE_ADDR="192.0.2.10") == 200  # not the owner
