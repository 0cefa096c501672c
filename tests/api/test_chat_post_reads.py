"""A chat POST reads its session, project and agent in one SQL query of its own: what it
loads is what the ORM loads, and it reaches only what project_list lets the caller reach."""

from __future__ import annotations

import uuid

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from agents.models import Agent
from chat.models import ChatSession
from chat.selectors import session_get_with_project
from governance.services import api_key_create
from projects.models import Project
from tests.factories import ChatSessionFactory, ProjectFactory

pytestmark = pytest.mark.django_db


def _fields(instance) -> dict:
    return {f.attname: getattr(instance, f.attname) for f in instance._meta.concrete_fields}


def test_the_session_its_project_and_agent_as_the_orm_loads_them(user):
    session = ChatSessionFactory(agent__project=ProjectFactory(owner=user))
    with CaptureQueriesContext(connection) as queries:
        found = session_get_with_project(
            user=user, project_id=session.project_id, session_id=str(session.id)
        )
        assert found.agent.params == {"temperature": 0.2, "top_k": 3}  # JSON, decoded
        assert found.project.owner_id == user.pk
    assert len(queries.captured_queries) == 1
    assert _fields(found) == _fields(ChatSession.objects.get(id=session.id))
    assert _fields(found.project) == _fields(Project.objects.get(id=session.project_id))
    assert _fields(found.agent) == _fields(Agent.objects.get(id=session.agent_id))


def test_only_what_the_caller_reaches(user, other_user):
    session = ChatSessionFactory(agent__project=ProjectFactory(owner=user))
    other = ProjectFactory(owner=user)
    ids = {"project_id": session.project_id, "session_id": session.id}
    assert session_get_with_project(user=other_user, **ids) is None
    own_key, _ = api_key_create(project=session.project, name="own", scopes=["chat"])
    other_key, _ = api_key_create(project=other, name="other", scopes=["chat"])
    assert session_get_with_project(user=user, credential=own_key, **ids) is not None
    assert session_get_with_project(user=user, credential=other_key, **ids) is None
    assert session_get_with_project(user=user, project_id=other.id, session_id=session.id) is None
    assert session_get_with_project(user=user, project_id="nope", session_id=session.id) is None
    assert session_get_with_project(user=user, project_id=session.project_id,
                                    session_id=uuid.uuid4()) is None  # fmt: skip
