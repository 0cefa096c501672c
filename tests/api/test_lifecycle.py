"""One project lifecycle on every path that changes a project's existence: the API, the
admin (one project, a bulk delete, deleting its user), a delete racing writers, a
delete while Redis is down, and a tombstone that must not outlive a mistake."""

from __future__ import annotations

import threading

import pytest
from django.contrib.auth import get_user_model
from django.db import connection

from agentbus import project_gone, project_tombstone
from agents.models import Agent
from chat.models import ChatSession
from projects.models import Project
from tests.conftest import _client_for
from tests.factories import AgentFactory, ChatSessionFactory, ProjectFactory, UserFactory
from tests.redis_server import private_redis
from tests.workers import broker_at, wait_for
from workspaces.manager import get_worker_space
from workspaces.models import WorkspaceTeardown
from workspaces.teardown import workspace_teardown_run

pytestmark = pytest.mark.django_db(transaction=True)


def owed(project_id) -> bool:
    return WorkspaceTeardown.objects.filter(project_id=project_id, status="pending").exists()


def test_deleting_a_user_in_the_admin_schedules_each_projects_teardown(admin_client):
    owner = UserFactory()
    projects = [ProjectFactory(owner=owner) for _ in range(2)]
    response = admin_client.post(
        f"/admin/auth/user/{owner.pk}/delete/", {"post": "yes"}, follow=True
    )
    assert response.status_code == 200
    assert not get_user_model().objects.filter(pk=owner.pk).exists()
    for project in projects:
        assert owed(project.id)  # at once, not two sweeps later
        assert project_gone(project.id)


def test_a_bulk_delete_in_the_admin_schedules_every_teardown(admin_client, user):
    projects = [ProjectFactory(owner=user) for _ in range(3)]
    response = admin_client.post(
        "/admin/projects/project/",
        {"action": "delete_selected", "_selected_action": [str(p.id) for p in projects],
         "post": "yes"},
        follow=True,
    )  # fmt: skip
    assert response.status_code == 200
    assert not Project.objects.filter(id__in=[p.id for p in projects]).exists()
    assert all(owed(p.id) for p in projects)


def test_the_owner_of_a_project_cannot_be_changed_in_the_admin(admin_client, user, other_user):
    project = ProjectFactory(owner=user)
    response = admin_client.post(
        f"/admin/projects/project/{project.id}/change/",
        {"name": "renamed", "description": "", "owner": other_user.pk, "flow_max_in_flight": 0},
        follow=True,
    )
    assert response.status_code == 200
    project.refresh_from_db()
    assert project.name == "renamed" and project.owner_id == user.pk


def test_the_admin_refuses_agent_params_the_api_refuses(admin_client, project):
    agent = AgentFactory(project=project)
    response = admin_client.post(
        f"/admin/agents/agent/{agent.id}/change/",
        {"name": agent.name, "system_prompt": "", "model": "m",
         "params": '{"temperature": 5, "top_k": "many"}'},
    )  # fmt: skip
    assert response.status_code == 200  # the form again, with errors
    assert "temperature" in response.content.decode()
    agent.refresh_from_db()
    assert agent.params != {"temperature": 5, "top_k": "many"}


def test_a_teardown_of_a_live_project_never_tombstones_it_and_a_wrong_tombstone_heals(user):
    project = ProjectFactory(owner=user)
    AgentFactory(project=project)
    WorkspaceTeardown.objects.create(project_id=project.id, user_id=user.pk)
    assert workspace_teardown_run(user_id=user.pk, project_id=project.id) is None
    assert not project_gone(project.id)
    assert WorkspaceTeardown.objects.get(project_id=project.id).status == "done"

    project_tombstone(project.id)  # set by mistake: nothing is deleting the project
    space = get_worker_space(user_id=user.pk, project_id=project.id)
    assert space.initialized and not project_gone(project.id)


def test_delete_with_redis_down_is_204_and_the_teardown_runs_later(api, user, settings):
    project = ProjectFactory(owner=user)
    AgentFactory(project=project)
    with private_redis() as server, broker_at(server.url):
        settings.REDIS_URL = settings.CELERY_BROKER_URL = server.url
        get_worker_space(user_id=user.pk, project_id=project.id)
        server.kill()
        response = api.delete(f"/my/projects/{project.id}/")
        assert response.status_code == 204, response.content
        assert not Project.objects.filter(id=project.id).exists()
        assert owed(project.id)  # the sweep dispatches it once Redis is back


@pytest.mark.skipif(
    connection.vendor != "postgresql", reason="SQLite serializes all writes: no race"
)
@pytest.mark.parametrize("writer", ["agent", "session", "message"])
def test_a_delete_racing_writers_never_answers_500(api, user, writer):
    for _ in range(5):
        project = ProjectFactory(owner=user)
        agent = AgentFactory(project=project)
        session = ChatSessionFactory(agent=agent, project=project)
        base = f"/my/projects/{project.id}"
        url, body = {
            "agent": (f"{base}/agents/", lambda i: {"name": f"a{i}"}),
            "session": (f"{base}/chat/", lambda i, a=agent.id: {"agent_id": str(a)}),
            "message": (f"{base}/chat/{session.id}/messages/", lambda i: {"content": f"m{i}"}),
        }[writer]
        codes: list[int] = []
        stop = threading.Event()

        def write(url=url, body=body, codes=codes, stop=stop):
            client = _client_for(user)
            i = 0
            while not stop.is_set() and i < 200:
                codes.append(client.post(url, body(i), format="json").status_code)
                i += 1
            connection.close()

        thread = threading.Thread(target=write)
        thread.start()
        assert wait_for(lambda codes=codes: codes, timeout=10)
        deleted = api.delete(f"{base}/")
        stop.set()
        thread.join(30)
        assert deleted.status_code == 204, deleted.content
        assert set(codes) <= {201, 202, 404}, codes
        assert not Agent.objects.filter(project_id=project.id).exists()
        assert not ChatSession.objects.filter(project_id=project.id).exists()
