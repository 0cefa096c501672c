"""Fixtures of the contract tests: the app under a live server, a real worker, a user
with a token, the runtime on its offline defaults (Qdrant local mode in a temporary
folder, the bundled embedder, the offline provider), and schemathesis run against it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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


HERE = Path(__file__).resolve().parent
# Fixed, so CI is repeatable; CONTRACT_SEED=random explores further.
SEED = os.environ.get("CONTRACT_SEED", "20261125")
MAX_EXAMPLES = os.environ.get("CONTRACT_MAX_EXAMPLES", "30")


@pytest.fixture
def schemathesis_run(asgi_server, token_user, live_worker, tmp_path):
    """`schemathesis_run(phases)`: schemathesis with `--checks all` against the live app
    (every operation but the never-ending event stream, as a staff user: the operators'
    endpoints too), its `phases` only; returns (exit code, summary)."""
    user, token = token_user
    user.is_staff = True
    user.save(update_fields=["is_staff"])

    def run(phases: str) -> tuple[int, str]:
        args = [
            "run", f"{asgi_server.url}/api/schema/", "--checks", "all",
            "--header", f"Authorization: Token {token}",
            "--exclude-operation-id", "sessions_events",
            "--phases", phases, "--max-examples", MAX_EXAMPLES, "--workers", "1",
            "--request-timeout", "30", "--report", "junit", "--report-dir", str(tmp_path),
        ]  # fmt: skip
        if SEED != "random":
            args += ["--seed", SEED]
        executable = Path(sys.executable).parent / "schemathesis"
        result = subprocess.run(
            [str(executable), "--no-color", "--config-file", str(HERE / "schemathesis.toml"),
             *args],
            cwd=tmp_path, capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        summary = result.stdout[-6000:]
        print(summary)  # the run's summary, in the test log
        return result.returncode, summary + result.stderr[-3000:]

    return run
