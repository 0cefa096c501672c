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
