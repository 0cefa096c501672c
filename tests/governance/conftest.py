from __future__ import annotations

import pytest
from rest_framework.test import APIClient

from tests.api.test_isolation import world  # noqa: F401  (a fixture)


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
