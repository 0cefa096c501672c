"""Helpers of the workspace tests: waiting, reading a workspace's keys, and Django
processes of our own against the test database."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from django.db import connection

from common.redis import get_redis
from context.vectorstore import close_vector_store
from tests.factories import AgentFactory, ProjectFactory
from workspaces.redis import workspace_prefix

ROOT = Path(__file__).resolve().parents[2]


def keys_under(user_id, project_id) -> set[str]:
    """Every Redis key under the workspace's prefix (full names)."""
    return set(get_redis().scan_iter(match=workspace_prefix(user_id, project_id) + "*"))


def snapshot(user_id, project_id, *, skip=("last-used",)) -> dict[str, bytes]:
    """The workspace's keys and their serialized values (DUMP), to compare later."""
    raw = get_redis()
    prefix = workspace_prefix(user_id, project_id)
    return {
        key: raw.execute_command("DUMP", key, NEVER_DECODE=True)
        for key in keys_under(user_id, project_id)
        if key[len(prefix) :] not in skip
    }


def django_process(code: str, *args: str, env: dict | None = None) -> subprocess.Popen:
    """A Python process with its own Django set up against this test run's database and
    Redis. `code` runs after django.setup(); `args` land in sys.argv[1:]."""
    prelude = (
        "import os, sys\n"
        "os.environ['DJANGO_SETTINGS_MODULE'] = 'config.settings.test'\n"
        "from django.conf import settings\n"
        "settings.DATABASES['default']['NAME'] = os.environ['UWS_TEST_DB_NAME']\n"
        "import django\n"
        "django.setup()\n"
    )
    full_env = dict(os.environ, UWS_TEST_DB_NAME=str(connection.settings_dict["NAME"]))
    full_env.update(env or {})
    return subprocess.Popen(
        [sys.executable, "-c", prelude + code, *args],
        cwd=ROOT,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def read_json_line(proc: subprocess.Popen, timeout: float = 60.0) -> dict:
    """The next JSON line the process prints (skipping anything else)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"process ended: {proc.wait()} {proc.stderr.read()[-3000:]}")
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise AssertionError("no JSON line in time")


class CountingAgentSource:
    """The registered agent source, noting each full load of a project's agents."""

    def __init__(self, source):
        self.source = source
        self.loads: list[list[str]] = []

    def configs(self, *, project_id):
        configs = self.source.configs(project_id=project_id)
        self.loads.append([c["id"] for c in configs])
        return configs

    def __getattr__(self, name):
        return getattr(self.source, name)


@pytest.fixture
def project_with_agents(user):
    project = ProjectFactory(owner=user)
    agents = [AgentFactory(project=project) for _ in range(3)]
    return project, agents


@pytest.fixture
def qdrant_path(tmp_path, settings):
    """Vector collections in a folder of this test's own (local mode)."""
    settings.QDRANT_URL = ""
    settings.QDRANT_PATH = str(tmp_path / "qdrant")
    close_vector_store()
    yield settings.QDRANT_PATH
    close_vector_store()
