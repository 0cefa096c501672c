"""Per-project provider settings: the endpoint, key and models a project's agents use,
over the deployment's; the key is stored encrypted and never appears in a response,
log line, event or error."""

from __future__ import annotations

import json
import logging

import pytest
import redis
from django.conf import settings

from chat.models import Message
from governance.models import ProviderSettings, RunUsage
from governance.secrets import secret_decrypt
from tests.factories import AgentFactory, ChatSessionFactory
from tests.governance.conftest import key_client, messages_url, wait_answered
from tests.local_http import RawEndpoint

SECRET = "sk-project-secret-8f3a1c"


def provider_url(project) -> str:
    return f"/my/projects/{project.id}/provider/"


def settings_body(**changes):
    return {"base_url": "", "default_model": "", "allowed_models": [], **changes}


@pytest.mark.django_db
def test_the_key_is_stored_encrypted_and_never_shown(api, project, make_key):
    empty = api.get(provider_url(project)).json()
    assert empty == {
        "base_url": "",
        "has_api_key": False,
        "default_model": "",
        "allowed_models": [],
        "updated_at": None,
    }
    body = settings_body(base_url="https://llm.example/v1", api_key=SECRET, default_model="m1")
    response = api.put(provider_url(project), body, format="json")
    assert response.status_code == 200, response.content
    assert SECRET not in response.content.decode() and response.json()["has_api_key"]
    stored = ProviderSettings.objects.get(project=project)
    assert (
        SECRET not in stored.api_key_encrypted
        and secret_decrypt(stored.api_key_encrypted) == SECRET
    )
    assert SECRET not in api.get(provider_url(project)).content.decode()
    raw, _ = make_key(project, ["read"])
    assert SECRET not in key_client(raw).get(provider_url(project)).content.decode()

    # Omitted: kept. Empty: removed.
    api.put(provider_url(project), settings_body(default_model="m2"), format="json")
    assert (
        ProviderSettings.objects.get(project=project).api_key_encrypted == stored.api_key_encrypted
    )
    cleared = api.put(provider_url(project), settings_body(api_key=""), format="json").json()
    assert not cleared["has_api_key"] and cleared["base_url"] == ""


@pytest.mark.django_db
@pytest.mark.parametrize(
    "body, field",
    [
        (settings_body(base_url="ftp://llm.example/"), "base_url"),
        (settings_body(base_url="not a url"), "base_url"),
        (settings_body(base_url="https://user:pw@llm.example/"), "base_url"),
        (settings_body(base_url="https://llm.example/ v1"), "base_url"),
        (settings_body(allowed_models="gpt"), "allowed_models"),
        (settings_body(allowed_models=[""]), "allowed_models"),
        (settings_body(api_key=123), "api_key"),
        ({"base_url": ""}, "default_model"),
        (settings_body(endpoint="x"), "endpoint"),
    ],
)
def test_bad_provider_settings_are_a_400_and_write_nothing(api, project, body, field):
    response = api.put(provider_url(project), body, format="json")
    assert response.status_code == 400, response.content
    assert field in response.json() and response.json()["code"] == "invalid"
    assert not ProviderSettings.objects.exists()


@pytest.mark.django_db
def test_only_the_owner_changes_them(other_api, project, make_key):
    body = settings_body(base_url="http://attacker.example/v1")
    assert other_api.put(provider_url(project), body, format="json").status_code == 404
    raw, _ = make_key(project, ["read", "write", "chat"])
    assert key_client(raw).put(provider_url(project), body, format="json").status_code == 403
    assert not ProviderSettings.objects.exists()


def _everything_said(api, project, session, caplog) -> str:
    """Every response, event, stored text, Redis value and log line this test could
    have leaked to."""
    said = [
        api.get(provider_url(project)).content.decode(),
        api.get(messages_url(session)).content.decode(),
        api.get(f"/my/projects/{project.id}/usage/").content.decode(),
        json.dumps(list(Message.objects.values_list("content", "error"))),
        json.dumps(list(RunUsage.objects.values()), default=str),
        caplog.text,
    ]
    raw = redis.Redis.from_url(settings.REDIS_URL)  # bytes: the broker's values are too
    try:
        for key in raw.scan_iter(match="*"):
            kind = raw.type(key).decode()
            value = {
                "string": lambda k: raw.get(k),
                "hash": raw.hgetall,
                "list": lambda k: raw.lrange(k, 0, -1),
                "set": raw.smembers,
                "zset": lambda k: raw.zrange(k, 0, -1),
                "stream": raw.xrange,
            }.get(kind, lambda k: b"")(key)
            said.append(repr(value))
    finally:
        raw.close()
    return "\n".join(said)


@pytest.mark.slow
def test_a_run_uses_its_projects_endpoint_key_and_model(
    live_worker, api, project, fake_openai, runtime_settings, caplog
):
    caplog.set_level(logging.DEBUG)
    runtime_settings.OPENAI_BASE_URL = ""  # no deployment endpoint: the project's alone
    runtime_settings.OPENAI_API_KEY = ""
    runtime_settings.EGRESS_ALLOW_NETWORKS = {"provider": ["127.0.0.0/8"]}  # the stub's
    body = settings_body(
        base_url=fake_openai.base_url,
        api_key=SECRET,
        default_model="project-model",
        allowed_models=["project-model", "other-model"],
    )
    assert api.put(provider_url(project), body, format="json").status_code == 200
    session = ChatSessionFactory(agent=AgentFactory(project=project, model=""))
    posted = api.post(messages_url(session), {"content": "hi"}, format="json").json()
    answer = wait_answered(posted["assistant_message_id"])
    assert answer.status == "done", answer.error
    assert fake_openai.headers[-1]["authorization"] == f"Bearer {SECRET}"
    assert fake_openai.requests[-1]["body"]["model"] == "project-model"
    assert RunUsage.objects.get(message_id=answer.id).model == "project-model"

    # A model the project does not allow: an error that names it, and no call.
    calls = len(fake_openai.requests)
    other = ChatSessionFactory(agent=AgentFactory(project=project, model="gpt-forbidden"))
    posted = api.post(messages_url(other), {"content": "hi"}, format="json").json()
    refused = wait_answered(posted["assistant_message_id"])
    assert refused.status == "error" and "gpt-forbidden" in refused.error
    assert len(fake_openai.requests) == calls
    assert not RunUsage.objects.filter(message_id=refused.id).exists()  # it cost nothing

    # The endpoint failing: that it failed is reported, not what it answered, nor the key.
    fake_openai.mode = "error"
    posted = api.post(messages_url(session), {"content": "again"}, format="json").json()
    failed = wait_answered(posted["assistant_message_id"])
    assert failed.status == "error" and "project's LLM endpoint failed" in failed.error
    assert "500" not in failed.error and "overloaded" not in failed.error

    said = _everything_said(api, project, session, caplog)
    assert "project-model" in said and "endpoint failed" in said  # the scan sees what was said
    assert "message.delta" in said  # ... and the events
    assert SECRET not in said


@pytest.mark.slow
def test_without_an_endpoint_of_its_own_a_project_uses_the_deployments(
    live_worker, api, project, fake_openai
):
    """The fixture points the deployment at the stub with the key `test-key`."""
    assert (
        api.put(
            provider_url(project), settings_body(default_model="house-model"), format="json"
        ).status_code
        == 200
    )
    session = ChatSessionFactory(agent=AgentFactory(project=project, model=""))
    posted = api.post(messages_url(session), {"content": "hi"}, format="json").json()
    assert wait_answered(posted["assistant_message_id"]).status == "done"
    assert fake_openai.headers[-1]["authorization"] == "Bearer test-key"
    assert fake_openai.requests[-1]["body"]["model"] == "house-model"


class _EndlessLine(RawEndpoint):
    """An OpenAI-protocol path that answers 200 and an SSE line that never ends, as fast
    as the client takes it; counts the bytes it sent."""

    sent = 0

    def __init__(self) -> None:
        super().__init__("/v1")
        self.base_url = self.url

    def answer(self, conn) -> None:
        head = b'data: {"id":"'
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n"
                     b"%x\r\n%s\r\n" % (len(head), head))  # fmt: skip
        chunk = b"100000\r\n" + b"x" * 0x100000 + b"\r\n"
        while not self.closed.is_set():
            conn.sendall(chunk)
            self.sent += 0x100000


@pytest.mark.slow
def test_a_project_endpoint_whose_line_never_ends_is_cut_off(
    live_worker, api, project, runtime_settings
):
    """The client holds an SSE line until it ends: from a project's own endpoint (anyone's
    server) a line past 1 MiB ends the call, not retried, saying why. Unbounded, one
    call held 1.7 GB of the worker's memory within 10 s, and went on."""
    runtime_settings.OPENAI_BASE_URL = runtime_settings.OPENAI_API_KEY = ""
    runtime_settings.EGRESS_ALLOW_NETWORKS = {"provider": ["127.0.0.0/8"]}
    endpoint = _EndlessLine()
    try:
        body = settings_body(base_url=endpoint.base_url, api_key=SECRET, default_model="m")
        assert api.put(provider_url(project), body, format="json").status_code == 200
        session = ChatSessionFactory(agent=AgentFactory(project=project, model=""))
        posted = api.post(messages_url(session), {"content": "hi"}, format="json").json()
        answer = wait_answered(posted["assistant_message_id"])
    finally:
        endpoint.stop()
    assert answer.status == "error", answer.error
    assert "answer was refused: a line of the answer passed 1048576 bytes" in answer.error
    assert endpoint.connections == 1  # not tried again
    assert endpoint.sent < 64 * 2**20, endpoint.sent
