#!/usr/bin/env python3
"""Print the project's files one chat message runs through, per side, in order.

Web side: `POST …/chat/{session_id}/messages/` through Django's test client (the request
up to its response, and the after-commit dispatch). Worker side: the run's task
(`agents.run_agent`) called in this process as a worker calls it, with an agent that
has a tool, so the tool loop is in the path. Every function call in every thread is
seen (sys.setprofile / threading.setprofile); a file counts once it runs a function.
A "double back" is a call from a file of a lower layer (README: the apps' layering)
into a file of a higher one that it imports; a call up into a file it does not import
runs a callback it was handed (a middleware's next handler, a hook, a task's body),
and is listed apart.

    bin/with-redis --ephemeral -- .venv/bin/python bin/message_path.py

Uses a throwaway SQLite database and Qdrant folder; offline provider and embedder.
"""

from __future__ import annotations

import ast
import os
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
LAYERS = [
    {"config"},
    {"chat"},
    {"tools"},
    {"context"},
    {"agents", "llm"},
    {"governance", "realtime"},
    {"workspaces"},
    {"projects", "agentbus"},
    {"common"},
]
RANK = {app: i for i, apps in enumerate(LAYERS) for app in apps}

if __name__ == "__main__":
    TMP = tempfile.mkdtemp(prefix="message-path-")
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.local")
    os.environ["DATABASE_URL"] = f"sqlite:///{TMP}/db.sqlite3"
    os.environ["QDRANT_PATH"] = f"{TMP}/qdrant"
    os.environ["OPENAI_BASE_URL"] = os.environ["OPENAI_API_KEY"] = ""
    # Django and the apps are imported only now: their settings read the variables above.
    import django

    django.setup()

from django.conf import settings  # noqa: E402
from django.contrib.auth.models import User  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.db import transaction  # noqa: E402
from rest_framework.test import APIClient  # noqa: E402

from agents.models import Agent, Tool  # noqa: E402
from chat.models import ChatSession, Run  # noqa: E402
from chat.tasks import run_agent  # noqa: E402
from common.redis import get_redis  # noqa: E402
from projects.models import Project  # noqa: E402


def main() -> None:
    settings.QDRANT_PATH, settings.QDRANT_URL = f"{TMP}/qdrant", ""
    call_command("migrate", verbosity=0)

    get_redis().flushdb()
    user = User.objects.create_user("path", password="x")
    project = Project.objects.create(owner=user, name="path")
    agent = Agent.objects.create(project=project, name="a", model="offline")
    Tool.objects.create(agent=agent, kind="builtin", name="search_context")
    session = ChatSession.objects.create(project=project, agent=agent)
    client = APIClient()
    client.force_authenticate(user)
    url = f"/my/projects/{project.id}/chat/{session.id}/messages/"

    def web():
        with transaction.atomic():  # the request's own, so its on_commit dispatch runs here
            response = client.post(url, {"content": "What do you hold?"}, format="json")
        assert response.status_code == 202, response.content

    web()  # once untraced: first-time imports and caches are not the message's path
    run = Run.objects.order_by("created_at").last()
    run_agent(user_id=user.pk, project_id=str(project.id), run_id=str(run.id), attempt=1)
    web_files, web_backs = trace(web)
    run = Run.objects.order_by("created_at").last()
    worker_files, worker_backs = trace(
        lambda: run_agent(
            user_id=user.pk, project_id=str(project.id), run_id=str(run.id), attempt=1
        )
    )
    for side, files, backs in (
        ("web", web_files, web_backs),
        ("worker", worker_files, worker_backs),
    ):
        imported = [(a, b) for a, b in backs if imports(a, b)]
        print(
            f"{side}: {len(files)} files, {len(imported)} double back(s), "
            f"{len(backs) - len(imported)} callback(s) up"
        )
        for name in files:
            print(f"  {name}")
        for caller, callee in backs:
            kind = "double back" if (caller, callee) in imported else "callback up"
            print(f"  {kind}: {caller} -> {callee}")


def imports(caller: str, callee: str) -> bool:
    """Whether the file `caller` imports the module of the file `callee` (anywhere in it,
    functions included)."""
    target = callee.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
    package = caller.removesuffix(".py").replace("/", ".").rsplit(".", 1)[0]
    for node in ast.walk(ast.parse((ROOT / caller).read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        if target in names:
            return True
    return False


def trace(action):
    order: list[str] = []
    backs: list[tuple[str, str]] = []
    lock = threading.Lock()
    root = str(ROOT) + os.sep

    def project_file(frame):
        name = frame.f_code.co_filename
        if not name.startswith(root):
            return None
        rel = name[len(root) :]
        if rel.startswith((".venv", "tests", "bin", "bench")) or "/migrations/" in rel:
            return None
        return rel

    def profile(frame, event, arg):
        if event != "call":
            return
        here = project_file(frame)
        if here is None:
            return
        caller = frame.f_back
        while caller is not None and project_file(caller) is None:
            caller = caller.f_back
        with lock:
            if here not in order:
                order.append(here)
            if caller is not None:
                there = project_file(caller)
                app_from, app_to = there.split("/")[0], here.split("/")[0]
                if (
                    app_from in RANK
                    and app_to in RANK
                    and RANK[app_to] < RANK[app_from]
                    and (there, here) not in backs
                ):
                    backs.append((there, here))

    threading.setprofile(profile)
    sys.setprofile(profile)
    try:
        action()
    finally:
        sys.setprofile(None)
        threading.setprofile(None)
    return order, backs


if __name__ == "__main__":
    main()
