import uuid

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from chat.models import ChatSession, Message
from tests.factories import AgentFactory, MessageFactory, ProjectFactory

pytestmark = pytest.mark.django_db


def chat_url(project, *parts):
    return "/".join([f"/my/projects/{project.id}/chat", *map(str, parts)]) + "/"


def test_sessions_create_list_get_delete(api, agent):
    project = agent.project
    created = api.post(chat_url(project), {"agent_id": str(agent.id), "title": "t"}, format="json")
    assert created.status_code == 201, created.content
    session = created.json()
    assert session["agent_id"] == str(agent.id) and session["title"] == "t"

    listing = api.get(chat_url(project)).json()
    assert listing["total"] == 1 and listing["sessions"][0]["id"] == session["id"]
    assert api.get(chat_url(project, session["id"])).status_code == 200
    assert api.delete(chat_url(project, session["id"])).status_code == 204
    assert api.get(chat_url(project, session["id"])).status_code == 404


def test_title_is_optional(api, agent):
    response = api.post(chat_url(agent.project), {"agent_id": str(agent.id)}, format="json")
    assert response.status_code == 201 and response.json()["title"] == ""


@pytest.mark.parametrize(
    "payload, field",
    [
        ({}, "agent_id"),
        ({"agent_id": "not-a-uuid"}, "agent_id"),
        ({"agent_id": None}, "agent_id"),
    ],
)
def test_bad_session_is_400_and_writes_nothing(api, agent, payload, field):
    response = api.post(chat_url(agent.project), payload, format="json")
    assert response.status_code == 400 and field in response.json()
    assert ChatSession.objects.count() == 0


def test_a_session_cannot_use_another_projects_agent(api, user, agent):
    """An agent id that is not the project's, however well formed, is a 404 naming the
    field: another project's agent does not exist from here."""
    own_other_project = ProjectFactory(owner=user)
    foreign_agent = AgentFactory()  # another user's project
    for candidate_id in (
        AgentFactory(project=own_other_project).id,
        foreign_agent.id,
        "00000000-0000-0000-0000-000000000000",
    ):
        response = api.post(chat_url(agent.project), {"agent_id": str(candidate_id)}, format="json")
        assert response.status_code == 404 and "agent_id" in response.json()
    assert ChatSession.objects.count() == 0


def test_posting_a_message_stores_it_and_answers_202(api, session):
    url = chat_url(session.project, session.id, "messages")
    response = api.post(url, {"content": "Hello there"}, format="json")
    assert response.status_code == 202, response.content
    stored = Message.objects.get(session=session, role="user")
    assert stored.content == "Hello there"
    listing = api.get(url).json()
    assert listing["total"] >= 1
    assert listing["messages"][0]["content"] == "Hello there"


@pytest.mark.parametrize(
    "payload, field",
    [
        ({}, "content"),
        ({"content": ""}, "content"),
        ({"content": "x" * (32 * 1024 + 1)}, "content"),
        ({"content": "hi", "role": "system"}, "role"),
    ],
)
def test_bad_message_is_400_and_writes_nothing(api, session, payload, field):
    response = api.post(chat_url(session.project, session.id, "messages"), payload, format="json")
    assert response.status_code == 400 and field in response.json()
    assert Message.objects.count() == 0


def test_messages_are_listed_in_conversation_order(api, session):
    for text in ("one", "two", "three"):
        MessageFactory(session=session, content=text)
    body = api.get(chat_url(session.project, session.id, "messages"), {"limit": 2}).json()
    assert [m["content"] for m in body["messages"]] == ["one", "two"]
    assert body["total"] == 3


def _project_lock(sql: str) -> bool:
    """projects.services' lock on the project row: FOR KEY SHARE on PostgreSQL; where the
    database has no row locks (SQLite) the same statement is a plain read of that row."""
    if connection.features.has_select_for_update:
        return "FOR KEY SHARE" in sql
    return sql.startswith('SELECT "projects_project"') and "JOIN" not in sql


def test_a_message_reads_its_project_session_and_agent_at_once_and_names_what_is_missing(
    api, other_api, session
):
    """A chat POST reads its project (scoped to the user), its session and the agent in
    one query, and the agent's latest version with the session's busy check; what is
    missing is still named: another user's project first, then the session."""
    url = chat_url(session.project, session.id, "messages")
    assert api.post(url, {"content": "warm"}, format="json").status_code == 202
    with CaptureQueriesContext(connection) as queries:
        assert api.post(url, {"content": "hi"}, format="json").status_code == 202
    sql = [q["sql"] for q in queries.captured_queries]
    reads = [q for q in sql if "projects_project" in q and not _project_lock(q)]
    assert len(reads) == 1, reads
    assert "agents_chatsession" in reads[0] and "agents_agent" in reads[0]
    versions = [q for q in sql if "agents_agentversion" in q]
    assert len(versions) == 1 and "agents_run" in versions[0], versions

    other = other_api.post(url, {"content": "hi"}, format="json")
    assert (other.status_code, other.json()["detail"]) == (404, "No such project.")
    gone = api.post(
        chat_url(session.project, uuid.uuid4(), "messages"), {"content": "hi"}, format="json"
    )
    assert (gone.status_code, gone.json()["detail"]) == (404, "No such chat session.")
    assert Message.objects.filter(session=session).count() == 4
