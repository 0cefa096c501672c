import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.test import Client

from chat.admin import MESSAGES_PER_PAGE
from projects.models import Project
from tests.factories import AgentFactory, ChatSessionFactory, MessageFactory, UserFactory
from workspaces.manager import get_worker_space
from workspaces.models import WorkspaceTeardown

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.django_db
def test_openapi_schema_describes_the_per_project_api():
    response = Client().get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json")
    assert response.status_code == 200
    schema = response.json()
    assert schema["openapi"].startswith("3.")
    paths = schema["paths"]
    for path in (
        "/my/projects/",
        "/my/projects/{project_id}/agents/",
        "/my/projects/{project_id}/chat/{session_id}/messages/",
    ):
        assert path in paths, path


@pytest.mark.django_db
def test_the_schema_documents_every_operation_as_it_answers():
    schema = Client().get("/api/schema/", {"format": "json"}).json()
    error = {"$ref": "#/components/schemas/Error"}
    operations = [
        (path, method, op) for path, item in schema["paths"].items() for method, op in item.items()
    ]
    assert len(operations) == 88
    for path, method, op in operations:
        where = f"{method.upper()} {path}"
        assert op.get("summary") and op.get("tags"), where
        assert "Resolves" not in op.get("description", ""), where  # no internal docstrings
        errors = {code: r for code, r in op["responses"].items() if code >= "400"}
        assert errors, where
        for code, response in errors.items():
            if "/health" in path and code == "503":
                continue
            if path.endswith(("/messages/", "/regenerate/")) and method == "post" and code == "429":
                quota = {"$ref": "#/components/schemas/QuotaExceeded"}  # Error, and more
                assert response["content"]["application/json"]["schema"] == quota
                continue
            assert response["content"]["application/json"]["schema"] == error, (where, code)
        if "{" in path:
            assert "404" in op["responses"], where
    lists = [op for _, method, op in operations if op["operationId"].endswith("_list")]
    assert len(lists) == 16
    for op in lists:
        params = {p["name"]: p["schema"] for p in op["parameters"] if p["in"] == "query"}
        assert params["limit"]["maximum"] == 200 and params["offset"]["minimum"] == 0
        body = op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
        envelope = schema["components"]["schemas"][body.rsplit("/", 1)[1]]
        assert set(envelope["required"]) >= {"total", "limit", "offset"}
    events = schema["paths"]["/my/projects/{project_id}/chat/{session_id}/events/"]["get"]
    assert "text/event-stream" in events["responses"]["200"]["content"]
    assert {p["name"] for p in events["parameters"]} >= {"cursor", "Last-Event-ID"}
    assert "MessageDeltaEvent" in schema["components"]["schemas"]
    assert {"tokenAuth", "bearerAuth"} <= set(schema["components"]["securitySchemes"])
    assert set(schema["components"]["schemas"]["Error"]["required"]) == {"detail", "code"}


@pytest.mark.django_db
@pytest.mark.parametrize("url", ["/api/docs/", "/api/redoc/"])
def test_the_docs_pages_load_nothing_from_outside(url):
    page = Client().get(url).content.decode()
    assert "/static/drf_spectacular_sidecar/" in page
    assert "https://" not in page, "a CDN or web font would leave the docs blank offline"


@pytest.mark.django_db
@pytest.mark.parametrize(
    "url",
    [
        "/admin/projects/project/",
        "/admin/agents/agent/",
        "/admin/chat/chatsession/",
        "/admin/chat/message/",
        "/admin/projects/project/?q=alpha",
        "/admin/chat/message/?role__exact=user&q=hello",
        "/admin/chat/message/?status__exact=error",
        "/admin/workspaces/workspace/",
        "/admin/workspaces/workspace/?q=project",
        "/admin/workspaces/workspaceteardown/",
        "/admin/governance/projectapikey/",
        "/admin/governance/quota/",
        "/admin/governance/runusage/",
        "/admin/governance/providersettings/",
        "/admin/governance/auditevent/",
        "/admin/governance/embeddingusage/",
    ],
)
def test_admin_changelists_render(url):
    staff = UserFactory(is_staff=True, is_superuser=True)
    MessageFactory(session=ChatSessionFactory(agent=AgentFactory()))
    client = Client()
    client.force_login(staff)
    assert client.get(url).status_code == 200


@pytest.mark.django_db
def test_admin_links_and_counts_between_related_objects():
    staff = UserFactory(is_staff=True, is_superuser=True)
    session = ChatSessionFactory(agent=AgentFactory(project__name="Alpha"))
    for i in range(3):
        MessageFactory(session=session, content=f"m{i}")
    client = Client()
    client.force_login(staff)
    projects = client.get("/admin/projects/project/").content.decode()
    assert f"/admin/agents/agent/?project__id__exact={session.project_id}" in projects
    assert f"/admin/chat/chatsession/?project__id__exact={session.project_id}" in projects
    owner = session.project.owner.username
    assert client.get(f"/admin/projects/project/?owner__id__exact={session.project.owner_id}")
    agents = client.get("/admin/agents/agent/").content.decode()
    assert owner in agents and "Alpha" in agents
    sessions = client.get("/admin/chat/chatsession/").content.decode()
    assert f"/admin/chat/message/?session__id__exact={session.id}" in sessions
    messages = client.get("/admin/chat/message/").content.decode()
    assert "status-badge" in messages and "Alpha" in messages


@pytest.mark.django_db
def test_the_session_page_shows_its_conversation_read_only_a_page_at_a_time():
    staff = UserFactory(is_staff=True, is_superuser=True)
    session = ChatSessionFactory(agent=AgentFactory())
    for i in range(MESSAGES_PER_PAGE + 5):
        MessageFactory(session=session, content=f"message number {i}")
    client = Client()
    client.force_login(staff)
    url = f"/admin/chat/chatsession/{session.id}/change/"
    first = client.get(url).content.decode()
    assert "message number 0" in first and f"message number {MESSAGES_PER_PAGE}" not in first
    assert "<textarea" not in first.split('id="conversation"')[1]
    assert f"{MESSAGES_PER_PAGE + 5} messages" in first
    second = client.get(url, {"mp": 2}).content.decode()
    assert f"message number {MESSAGES_PER_PAGE}" in second and "message number 0<" not in second


def _manage(settings_module: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    environment = {
        k: v
        for k, v in os.environ.items()
        if k not in ("SECRET_KEY", "DEBUG", "PROVIDER_KEYS_FERNET_KEY", "PROVIDER_KEYS_FERNET_KEYS")
    }
    environment.update(DJANGO_SETTINGS_MODULE=settings_module, **env)
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_production_settings_refuse_to_start_without_a_secret_key():
    result = _manage("config.settings.production", "check", ALLOWED_HOSTS="example.com")
    assert result.returncode != 0
    assert "SECRET_KEY" in result.stderr


def test_production_settings_refuse_to_start_without_a_provider_keys_key():
    result = _manage(
        "config.settings.production",
        "check",
        SECRET_KEY="k8Jr2vQz7mXw4pLs9TnBy6HdFc3GaRe5UoViKt1NjMbZqWhYxCl0OsPuAeDgSfIr",
        ALLOWED_HOSTS="example.com",
    )
    assert result.returncode != 0
    assert "PROVIDER_KEYS_FERNET_KEY" in result.stderr


def test_production_settings_pass_the_deploy_check():
    result = _manage(
        "config.settings.production",
        "check",
        "--deploy",
        "--fail-level",
        "WARNING",
        SECRET_KEY="k8Jr2vQz7mXw4pLs9TnBy6HdFc3GaRe5UoViKt1NjMbZqWhYxCl0OsPuAeDgSfIr",
        ALLOWED_HOSTS="api.example.com",
        PROVIDER_KEYS_FERNET_KEY="h6Qx0Hj0m3f0b1x2Qp6dWc9VJ8k0Zy5n4r3s2t1u0vA=",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


@pytest.mark.django_db(transaction=True)
def test_admin_delete_of_a_project_records_its_teardown():
    staff = UserFactory(is_staff=True, is_superuser=True)
    agent = AgentFactory()
    client = Client()
    client.force_login(staff)
    response = client.post(f"/admin/projects/project/{agent.project_id}/delete/", {"post": "yes"})
    assert response.status_code == 302
    assert not Project.objects.filter(id=agent.project_id).exists()
    assert WorkspaceTeardown.objects.filter(project_id=agent.project_id).exists()


@pytest.mark.django_db(transaction=True)
def test_admin_edit_of_an_agent_reaches_the_workspace_cache(redis_client):
    staff = UserFactory(is_staff=True, is_superuser=True)
    agent = AgentFactory(name="before")
    project = agent.project
    space = get_worker_space(user_id=project.owner_id, project_id=project.id)
    assert space.get_agent(agent.id)["name"] == "before"

    client = Client()
    client.force_login(staff)
    response = client.post(
        f"/admin/agents/agent/{agent.id}/change/",
        {
            "name": "after",
            "system_prompt": "p",
            "model": "m",
            "params": "{}",
            "busy_policy": "enqueue",
        },
    )
    assert response.status_code == 302, response.content[:500]
    assert space.get_agent(agent.id)["name"] == "after"
