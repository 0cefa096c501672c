"""Safe by default: every entry point falls back to the production settings (which
refuse to start without their secrets), and no process of the Procfile creates an
account."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model
from django.db import connection

from tests.workers import database_url

ROOT = Path(__file__).resolve().parents[2]
SECRETS = ("SECRET_KEY", "DEBUG", "PROVIDER_KEYS_FERNET_KEY", "PROVIDER_KEYS_FERNET_KEYS")


def _bare_environment(**extra) -> dict:
    """The machine's environment without a settings module or any secret."""
    env = {k: v for k, v in os.environ.items() if k not in (*SECRETS, "DJANGO_SETTINGS_MODULE")}
    env.update(extra)
    return env


@pytest.mark.parametrize(
    "code",
    [
        "import config.asgi",
        "import config.wsgi",
        "import config.celery_app, django; django.setup()",
    ],
)
def test_entry_points_default_to_production_settings(code):
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=_bare_environment(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0, "started on development settings"
    assert "SECRET_KEY" in result.stderr


def test_manage_py_defaults_to_production_settings():
    result = subprocess.run(
        [sys.executable, "manage.py", "diffsettings"],
        cwd=ROOT,
        env=_bare_environment(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0 and "SECRET_KEY" in result.stderr


def test_the_makefile_names_the_settings_of_run_and_test():
    makefile = (ROOT / "Makefile").read_text()
    assert "run: export DJANGO_SETTINGS_MODULE = config.settings.local" in makefile
    assert "test: export DJANGO_SETTINGS_MODULE = config.settings.test" in makefile


def test_no_procfile_process_creates_an_account():
    procfile = (ROOT / "Procfile").read_text()
    processes = [line for line in procfile.splitlines() if re.match(r"^[a-z-]+:", line)]
    for line in processes:
        if "demo_user" in line:
            assert "--banner" in line, line  # the banner only reads


@pytest.mark.django_db(transaction=True)
def test_the_banner_creates_no_user():
    proc = subprocess.Popen(
        [
            sys.executable,
            "manage.py",
            "demo_user",
            "--banner",
            "--wait",
            "0",
            "--base-url",
            "http://127.0.0.1:9",
        ],
        cwd=ROOT,
        env=_bare_environment(
            DJANGO_SETTINGS_MODULE="config.settings.test", DATABASE_URL=database_url()
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        output, deadline = "", time.monotonic() + 60
        while "Ctrl-C stops everything" not in output and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
            output += line
        assert "Ctrl-C stops everything" in output, output
        assert "manage.py demo_user` creates it" in output
    finally:
        proc.terminate()
        proc.wait(15)
    assert not get_user_model().objects.filter(username="demo").exists()


@pytest.mark.django_db
def test_libpq_parameters_in_the_database_url_reach_the_pooled_connections():
    """`?sslmode=…` and the like in DATABASE_URL are kept beside the pool (they were
    replaced by it), and a connection gets the bounds on a host that answers nothing
    (DB_TCP_TIMEOUT_SECONDS, TCP keepalives) unless the URL names its own."""
    if connection.vendor != "postgresql":
        pytest.skip("libpq parameters are PostgreSQL's")
    code = (
        "import django; django.setup()\n"
        "from django.db import connection\n"
        "connection.ensure_connection()\n"
        "params = connection.connection.info.get_parameters()\n"
        "print(params['application_name'], params['tcp_user_timeout'], params['keepalives_idle'],"
        " 'pool' in connection.settings_dict['OPTIONS'])\n"
    )
    url = f"{database_url()}?application_name=uws-probe&keepalives_idle=7"
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings.test", "DATABASE_URL": url},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["uws-probe", "10000", "7", "True"]
