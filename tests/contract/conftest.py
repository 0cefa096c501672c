"""Fixtures of the contract tests: the app under a live server, a real worker, a user
with a token, and the runtime on its offline defaults (Qdrant local mode in a temporary
folder, the bundled embedder, the offline provider)."""

from __future__ import annotations

import pytest
from rest_framework.authtoken.models import Token

from context.vectorstore import close_vector_store
from tests.contract.live import LiveServer
from tests.factories import UserFactory


@pytest.fixture(scope="session")
def contract_qdrant_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("contract-qdrant")
    yield str(path)
    close_vector_store()


@pytest.fixture
def offline_runtime(settings, contract_qdrant_path):
    settings.QDRANT_PATH = contract_qdrant_path
    settings.QDRANT_URL = ""
    settings.OPENAI_BASE_URL = ""
    settings.OPENAI_API_KEY = ""
    settings.EMBEDDINGS_BASE_URL = ""
    return settings


@pytest.fixture
def asgi_server(transactional_db, offline_runtime):
    server = LiveServer().start()
    yield server
    server.stop()


@pytest.fixture
def token_user(transactional_db):
    user = UserFactory()
    return user, Token.objects.get_or_create(user=user)[0].key
