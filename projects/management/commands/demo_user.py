"""The demo user of `make run`, and the banner `make run` shows once the stack answers."""

from __future__ import annotations

import json
import signal
import sys
import time
import urllib.error
import urllib.request

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand
from rest_framework.authtoken.models import Token

WAIT_SECONDS = 180


class Command(BaseCommand):
    help = (
        "Create the demo user (idempotent; a superuser, for the admin) and print its API "
        "token (`make run` does, before it starts the stack). With --banner: create nothing; "
        "wait until the web server, a worker and Flower answer, print where everything is "
        "(the demo user's token if it exists), and stay until stopped (a process of the "
        "Procfile, which may run in production: so it never creates an account)."
    )

    def add_arguments(self, parser):
        parser.add_argument("--username", default="demo")
        parser.add_argument("--password", default="demo-password")
        parser.add_argument("--banner", action="store_true")
        parser.add_argument(
            "--wait",
            type=float,
            default=WAIT_SECONDS,
            help="how long --banner waits for the stack (seconds)",
        )
        parser.add_argument(
            "--base-url",
            default="http://127.0.0.1:8000",
            help="where the web server answers (for --banner)",
        )

    def handle(self, *args, username: str, password: str, banner: bool, base_url: str, **opts):
        if banner:
            self._show_banner(
                username=username, password=password, base_url=base_url, wait=opts["wait"]
            )
            return
        user, created = get_user_model().objects.get_or_create(
            username=username, defaults={"is_staff": True, "is_superuser": True}
        )
        if created:
            user.set_password(password)
            user.save(update_fields=["password"])
        token, _ = Token.objects.get_or_create(user=user)
        verb = "Created" if created else "Found"
        self.stdout.write(f"{verb} user {username!r} (password {password!r} if newly created).")
        self.stdout.write(f"API token: {token.key}")

    def _show_banner(self, *, username: str, password: str, base_url: str, wait: float) -> None:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        signal.signal(signal.SIGINT, lambda *_: sys.exit(0))
        # Read only: the account is `make run`'s to create, never a Procfile process's.
        token = Token.objects.filter(user__username=username).first()
        key = token.key if token else ""
        health = self._wait_for_stack(base_url.rstrip("/"), key, wait)
        self.stdout.write(self._banner(base_url.rstrip("/"), username, password, key, health))
        self.stdout.flush()
        while True:  # honcho stops every process when one exits: stay until stopped
            signal.pause()

    def _wait_for_stack(self, base: str, token: str, wait: float) -> dict:
        """Until the web server answers, a worker reports alive and Flower answers (or
        `wait` seconds pass): the health report, or {} if the web server never answered."""
        deadline = time.monotonic() + wait
        health: dict = {}
        while time.monotonic() < deadline:
            health = _get_json(f"{base}/admin/workspaces/health", token) or {}
            workers = health.get("checks", {}).get("workers", {}).get("healthy")
            if workers and _answers(settings.FLOWER_URL):
                break
            time.sleep(1)
        return health

    def _banner(self, base, username, password, token, health) -> str:
        checks = health.get("checks", {})
        lines = [
            "",
            "=" * 78,
            "  User Worker Space is ready"
            if health
            else "  User Worker Space: the web "
            "server did not answer in time (see the web.1 lines above)",
            "",
            f"  API      {base}/my/projects/",
            f"  Docs     {base}/api/docs/   (ReDoc: {base}/api/redoc/)",
            f"  Admin    {base}/admin/   user {username} / {password}"
            if token
            else f"  Admin    {base}/admin/",
            f"  Flower   {settings.FLOWER_URL}",
        ]
        if token:
            lines += [
                f"  Token    {token}",
                f'           curl -H "Authorization: Token {token}" {base}/my/projects/',
            ]
        else:
            lines.append(f"  Token    no user {username!r}: `manage.py demo_user` creates it")
        lines += [
            f"  LLM      {_llm_line(checks.get('llm'))}",
        ]
        if health and not checks.get("workers", {}).get("healthy"):
            lines.append("  Worker   none reported itself alive yet (see the worker.1 lines)")
        lines += ["", "  Ctrl-C stops everything.", "=" * 78, ""]
        return "\n".join(lines)


def _llm_line(report: dict | None) -> str:
    if not report:
        return "unknown (no health report)"
    if report.get("provider") == "offline":
        return "none configured: the offline provider answers (set OPENAI_BASE_URL)"
    default = report.get("default_model") or "none: set LLM_DEFAULT_MODEL"
    line = f"{report.get('endpoint')} (default model: {default})"
    if report.get("healthy"):
        return f"{line}: reachable"
    return f"{line}: UNHEALTHY: {report.get('error')}"


def _get_json(url: str, token: str) -> dict | None:
    headers = {"Authorization": f"Token {token}"} if token else {}
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:  # 503: unhealthy, with the same report
        try:
            return json.load(exc)
        except ValueError:
            return None
    except (OSError, ValueError):
        return None


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False
