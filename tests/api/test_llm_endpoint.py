"""The LLM endpoint: an agent without a model asks LLM_DEFAULT_MODEL, and health names
the endpoint and says whether it answers, never showing the key."""

from __future__ import annotations

import json
import socket

import pytest
from rest_framework.test import APIClient

from llm.providers import ChatRequest, ProviderError
from llm.selectors import llm_health
from tests.factories import UserFactory
from tests.runtime.openai_server import FakeOpenAI

SECRET = "sk-very-secret-key"


@pytest.fixture
def fake_llm(settings):
    server = FakeOpenAI().start()
    settings.OPENAI_BASE_URL = server.base_url
    settings.OPENAI_API_KEY = SECRET
    settings.LLM_MAX_RETRIES = 0
    yield server
    server.stop()


def test_an_agent_without_a_model_asks_the_default_one(fake_llm, settings):
    # openai (llm.openai_api) loads only in the tests that use it
    from llm.openai_api import OpenAIProvider, openai_client

    settings.LLM_DEFAULT_MODEL = "house-model"
    request = ChatRequest(model="", messages=[{"role": "user", "content": "hi"}])
    answer = "".join(OpenAIProvider(openai_client()).stream(request))
    assert answer == "Hello from the model."
    assert fake_llm.requests[-1]["body"]["model"] == "house-model"

    request = ChatRequest(model="own-model", messages=[{"role": "user", "content": "hi"}])
    "".join(OpenAIProvider(openai_client()).stream(request))
    assert fake_llm.requests[-1]["body"]["model"] == "own-model"


def test_without_an_endpoint_health_names_the_offline_provider(settings):
    settings.OPENAI_BASE_URL = settings.OPENAI_API_KEY = ""
    report = llm_health()
    assert report["healthy"] and report["provider"] == "offline"


def test_a_reachable_endpoint_is_healthy_and_its_key_is_not_shown(fake_llm, settings):
    report = llm_health()
    assert report["healthy"] and report["reachable"]
    assert report["endpoint"] == fake_llm.base_url.rstrip("/")
    assert report["api_key_set"] is True
    assert SECRET not in json.dumps(report)


def test_an_unreachable_endpoint_is_unhealthy_and_named(settings):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    settings.OPENAI_BASE_URL = f"http://user:{SECRET}@127.0.0.1:{port}/v1"
    settings.OPENAI_API_KEY = SECRET
    report = llm_health()
    assert not report["healthy"] and report["reachable"] is False
    assert report["endpoint"] == f"http://127.0.0.1:{port}/v1"  # credentials stripped
    assert "could not be reached" in report["error"]
    assert SECRET not in json.dumps(report)


@pytest.mark.django_db
def test_health_reports_the_llm_check(settings, fake_llm):
    staff = UserFactory(is_staff=True)
    client = APIClient()
    client.force_authenticate(staff)
    body = client.get("/admin/workspaces/health").json()
    assert body["checks"]["llm"]["endpoint"] == fake_llm.base_url.rstrip("/")
    assert SECRET not in json.dumps(body)


def test_without_a_default_model_the_error_says_what_to_set(fake_llm, settings):
    # openai (llm.openai_api) loads only in the tests that use it
    from llm.openai_api import OpenAIProvider, openai_client

    settings.LLM_DEFAULT_MODEL = ""
    with pytest.raises(ProviderError, match="LLM_DEFAULT_MODEL"):
        list(OpenAIProvider(openai_client()).stream(ChatRequest(model="", messages=[])))
    assert "LLM_DEFAULT_MODEL" in llm_health()["note"]
