"""Secrets at rest: projects' tool secrets are encrypted like provider keys, keys are a
list that can be rotated, a malformed key fails the checks, and the scrubber catches the
forms in which a server echoes a secret back."""

from __future__ import annotations

import base64
import importlib
import io
import json
import os
import subprocess
import sys
import types
from urllib.parse import quote, quote_plus, urlencode

import pytest
from cryptography.fernet import Fernet
from django.core.management import call_command
from django.db import connection

from agents.models import ProjectSecret
from governance.models import ProviderSettings
from governance.secrets import secret_decrypt, secret_encrypt
from tests.api.test_schema_and_admin import ROOT, _manage
from tools.runner import SCRUBBED, scrub

SECRET = 'tool-s3cret-"quoted"\\back/slash+plus&amp'


def _stored_value(secret_id) -> str:
    with connection.cursor() as cursor:
        cursor.execute("SELECT value FROM agents_projectsecret WHERE id = %s", [secret_id.hex])
        row = cursor.fetchone()
        if row is None:  # PostgreSQL keeps uuids as uuids
            cursor.execute("SELECT value FROM agents_projectsecret WHERE id = %s", [secret_id])
            row = cursor.fetchone()
    return row[0]


@pytest.mark.django_db
def test_tool_secrets_are_stored_encrypted(api, project):
    response = api.post(
        f"/my/projects/{project.id}/secrets/", {"name": "API_TOKEN", "value": SECRET}, format="json"
    )
    assert response.status_code == 201, response.content
    secret = ProjectSecret.objects.get(project=project)
    stored = _stored_value(secret.id)
    assert SECRET not in stored and "s3cret" not in stored
    assert secret_decrypt(stored) == SECRET and secret.value == SECRET


@pytest.mark.django_db
def test_the_migration_encrypts_rows_stored_in_clear(project):
    secret = ProjectSecret.objects.create(project=project, name="OLD", value="placeholder")
    with connection.cursor() as cursor:  # as the table held it before
        cursor.execute(
            "UPDATE agents_projectsecret SET value = %s WHERE name = %s", ["clear-value-1", "OLD"]
        )
    migration = importlib.import_module("agents.migrations.0004_encrypt_project_secrets")
    migration.encrypt_clear_rows(None, types.SimpleNamespace(connection=connection))
    migration.encrypt_clear_rows(None, types.SimpleNamespace(connection=connection))  # twice
    assert "clear-value-1" not in _stored_value(secret.id)
    assert ProjectSecret.objects.get(id=secret.id).value == "clear-value-1"


@pytest.mark.django_db
def test_keys_rotate_to_the_first_and_the_old_one_can_go(project, settings):
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    settings.PROVIDER_KEYS_FERNET_KEY = ""
    settings.PROVIDER_KEYS_FERNET_KEYS = [old]
    secret = ProjectSecret.objects.create(project=project, name="T", value="tool-value-1")
    ProviderSettings.objects.create(project=project, api_key_encrypted=secret_encrypt("sk-1"))

    settings.PROVIDER_KEYS_FERNET_KEYS = [new, old]  # the new key first: both read
    assert ProjectSecret.objects.get(id=secret.id).value == "tool-value-1"
    out = io.StringIO()
    call_command("rotate_secrets", stdout=out)
    assert "1 provider keys, 1 tool secrets" in out.getvalue()

    settings.PROVIDER_KEYS_FERNET_KEYS = [new]  # the old key dropped
    assert ProjectSecret.objects.get(id=secret.id).value == "tool-value-1"
    assert secret_decrypt(ProviderSettings.objects.get().api_key_encrypted) == "sk-1"
    assert Fernet(new).decrypt(_stored_value(secret.id).encode()) == b"tool-value-1"


@pytest.mark.django_db
def test_the_single_key_setting_still_works(project, settings):
    key = Fernet.generate_key().decode()
    settings.PROVIDER_KEYS_FERNET_KEYS = []
    settings.PROVIDER_KEYS_FERNET_KEY = key
    token = secret_encrypt("x-value")
    assert Fernet(key).decrypt(token.encode()) == b"x-value"


PRODUCTION = {
    "SECRET_KEY": "k8Jr2vQz7mXw4pLs9TnBy6HdFc3GaRe5UoViKt1NjMbZqWhYxCl0OsPuAeDgSfIr",
    "ALLOWED_HOSTS": "api.example.com",
}


def test_a_malformed_key_fails_the_deploy_check():
    result = _manage(
        "config.settings.production",
        "check",
        "--deploy",
        PROVIDER_KEYS_FERNET_KEY="notakey",
        **PRODUCTION,
    )
    assert result.returncode != 0
    assert "governance.E002" in result.stderr + result.stdout


def test_a_malformed_key_in_the_list_fails_the_check():
    good = Fernet.generate_key().decode()
    result = _manage(
        "config.settings.production",
        "check",
        PROVIDER_KEYS_FERNET_KEYS=f"{good},notakey",
        **PRODUCTION,
    )
    assert result.returncode != 0 and "governance.E002" in result.stderr + result.stdout


@pytest.mark.parametrize(
    "echo",
    [
        lambda s: json.dumps({"headers": {"X-Key": s}}),  # JSON-escaped
        lambda s: json.dumps({"k": s + "é"}),  # JSON-escaped, \u escapes around it
        lambda s: "https://example.com/?" + urlencode({"key": s}),  # form-encoded
        lambda s: "/echo/" + quote(s, safe=""),  # percent-encoded
        lambda s: "echo " + quote_plus(s),
        lambda s: "basic " + base64.b64encode(s.encode()).decode(),
        lambda s: "token=" + base64.urlsafe_b64encode(s.encode()).decode().rstrip("="),
    ],
)
def test_the_scrubber_catches_escaped_echoes(echo):
    scrubbed = scrub(echo(SECRET), {"API_TOKEN": SECRET})
    assert SCRUBBED in scrubbed
    for form in (SECRET, json.dumps(SECRET)[1:-1], quote(SECRET, safe=""), quote_plus(SECRET)):
        assert form not in scrubbed
    assert base64.b64encode(SECRET.encode()).decode().rstrip("=") not in scrubbed


def test_a_worker_with_a_malformed_key_does_not_start():
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings.test",
        "PROVIDER_KEYS_FERNET_KEY": "notakey",
    }
    result = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "config", "worker", "-Q", "wt-none",
         "--pool=solo", "--loglevel=WARNING"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode != 0
    assert "malformed" in result.stderr + result.stdout
