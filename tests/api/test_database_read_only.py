"""A PostgreSQL that answers but refuses writes (a standby, or a server its operator or
host made read-only, as some hosts do when its disk fills): every change answers 503
with Retry-After and a detail saying so, never a 500, reads still answer, and health
names it. The server is made read-only for the test's own database session
(`default_transaction_read_only`), which the test client's requests share."""

from __future__ import annotations

import contextlib

import pytest
from django.db import connection
from django.test import Client
from rest_framework.test import APIClient

from agents.models import Agent
from chat.models import Message
from projects.models import Project
from tests.factories import AgentFactory, ChatSessionFactory, ProjectFactory, UserFactory

pytestmark = pytest.mark.django_db(transaction=True)


@contextlib.contextmanager
def read_only():
    with connection.cursor() as cursor:
        cursor.execute("SET default_transaction_read_only = on")
    try:
        yield
    finally:
        with connection.cursor() as cursor:
            cursor.execute("SET default_transaction_read_only = off")


@pytest.fixture(autouse=True)
def _postgresql_only():
    if connection.vendor != "postgresql":
        pytest.skip("read-only transactions are PostgreSQL's (SQLite's is a file mode)")


def test_changes_answer_503_reads_answer_and_health_says_why(api, user):
    project = ProjectFactory(owner=user)
    agent = AgentFactory(project=project, model="m1")
    session = ChatSessionFactory(agent=agent, project=project)
    base = f"/my/projects/{project.id}"
    staff = APIClient()
    staff.force_authenticate(UserFactory(is_staff=True))
    assert staff.get("/admin/workspaces/health").json()["checks"]["database"]["healthy"]

    with read_only():
        for response in (
            api.post("/my/projects/", {"name": "new"}, format="json"),
            api.patch(f"{base}/agents/{agent.id}/", {"model": "m2"}, format="json"),
            api.post(f"{base}/chat/{session.id}/messages/", {"content": "hi"}, format="json"),
        ):
            assert response.status_code == 503, response.content
            assert response["Retry-After"]
            assert "read-only" in response.json()["detail"]
        assert api.get(f"{base}/agents/").status_code == 200
        health = staff.get("/admin/workspaces/health")
        database = health.json()["checks"]["database"]

    assert health.status_code == 503
    assert database["healthy"] is False and "refuses writes" in database["error"], database
    assert Project.objects.filter(owner=user).count() == 1
    assert Agent.objects.get(id=agent.id).model == "m1"
    assert not Message.objects.filter(session=session).exists()
    assert staff.get("/admin/workspaces/health").json()["checks"]["database"]["healthy"]


def test_a_page_that_writes_answers_a_plain_503():
    """Pages outside the API (the admin: signing out deletes the session's row) answer
    a plain 503 with the same detail."""
    admin = Client()
    admin.force_login(UserFactory(is_staff=True))
    with read_only():
        response = admin.post("/admin/logout/")
    assert response.status_code == 503
    assert response["Retry-After"] and b"read-only" in response.content
    assert admin.get("/admin/").status_code == 200  # still signed in
