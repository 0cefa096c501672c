from __future__ import annotations

import pytest
from rest_framework.test import APIClient

from chat.models import Message
from tests.api.test_isolation import world  # noqa: F401  (a fixture)
from tests.workers import wait_until


def key_client(raw_key: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw_key}")
    return client


@pytest.fixture
def make_key(api):
    """Create a key through the API: returns (raw key, its JSON)."""

    def make(project, scopes, name="ci key"):
        response = api.post(
            f"/my/projects/{project.id}/keys/", {"name": name, "scopes": scopes}, format="json"
        )
        assert response.status_code == 201, response.content
        body = response.json()
        return body["key"], body

    return make


# The runtime's fixtures: Qdrant in a temporary folder, the offline provider unless a
# test asks for the OpenAI-protocol stub server.
from tests.runtime.conftest import fake_openai, qdrant_path, runtime_settings  # noqa: E402, F401


def messages_url(session) -> str:
    return f"/my/projects/{session.project_id}/chat/{session.id}/messages/"


def wait_answered(message_id: int, timeout: float = 30):
    """The assistant message once it ended (done, error or cancelled)."""
    return wait_until(
        lambda: Message.objects.filter(id=message_id, status__in=Message.FINISHED).first(),
        timeout=timeout,
        what=f"message {message_id} answered",
    )
