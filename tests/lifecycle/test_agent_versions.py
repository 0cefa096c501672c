"""Agent versions: every change to an agent's definition makes one; the owner lists,
compares and rolls back; a session pins one; a run records the one it used and answers
with a pinned version's prompt and model."""

from __future__ import annotations

import pytest

from agents.models import AgentVersion
from chat.models import Run
from tests.runtime.conftest import wait_for_event


def agents_url(project_id):
    return f"/my/projects/{project_id}/agents/"


@pytest.fixture
def made(api, project):
    response = api.post(
        agents_url(project.id),
        {"name": "helper", "system_prompt": "Be brief.", "model": "m-1"},
        format="json",
    )
    assert response.status_code == 201, response.content
    return response.json()


def versions_url(project_id, agent_id, suffix=""):
    return f"{agents_url(project_id)}{agent_id}/versions/{suffix}"


def test_each_change_makes_a_version_and_no_change_makes_none(api, project, made):
    url = f"{agents_url(project.id)}{made['id']}/"
    assert api.patch(url, {"system_prompt": "Be thorough."}, format="json").status_code == 200
    assert api.patch(url, {"system_prompt": "Be thorough."}, format="json").status_code == 200
    assert (
        api.patch(url, {"model": "m-2", "params": {"temperature": 0.5}}, format="json").status_code
        == 200
    )
    tool = api.post(f"{url}tools/", {"kind": "builtin", "name": "search_context"}, format="json")
    assert tool.status_code == 201, tool.content

    listing = api.get(versions_url(project.id, made["id"])).json()
    assert listing["total"] == 4
    numbers = [v["number"] for v in listing["versions"]]
    assert numbers == [4, 3, 2, 1]
    v1, v4 = listing["versions"][-1], listing["versions"][0]
    assert v1["system_prompt"] == "Be brief." and v1["model"] == "m-1" and v1["tools"] == []
    assert [t["name"] for t in v4["tools"]] == ["search_context"]

    diff = api.get(versions_url(project.id, made["id"], "3/diff/?against=1")).json()
    assert diff["fields"]["system_prompt"] == {"from": "Be brief.", "to": "Be thorough."}
    assert diff["fields"]["model"] == {"from": "m-1", "to": "m-2"}
    assert (
        "-Be brief." in diff["system_prompt_diff"] and "+Be thorough." in diff["system_prompt_diff"]
    )
    diff = api.get(versions_url(project.id, made["id"], "4/diff/")).json()
    assert diff["tools_added"] == ["search_context"] and diff["fields"] == {}


def test_rollback_restores_fields_and_tools_as_a_new_version(api, project, made):
    url = f"{agents_url(project.id)}{made['id']}/"
    api.patch(url, {"system_prompt": "Changed.", "model": "m-9"}, format="json")
    api.post(f"{url}tools/", {"kind": "builtin", "name": "add_context"}, format="json")
    response = api.post(versions_url(project.id, made["id"], "1/rollback/"), {}, format="json")
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["version"]["number"] == 4 and body["version"]["restored_from"] == 1
    agent = api.get(url).json()
    assert agent["system_prompt"] == "Be brief." and agent["model"] == "m-1"
    assert api.get(f"{url}tools/").json()["total"] == 0
    # History stays: every version is still there, unchanged.
    assert AgentVersion.objects.filter(agent_id=made["id"]).count() == 4
    assert AgentVersion.objects.get(agent_id=made["id"], number=2).system_prompt == "Changed."


def test_versions_validate_and_are_404_for_others(api, other_api, project, made):
    assert api.get(versions_url(project.id, made["id"], "9/")).status_code == 404
    bad = api.get(versions_url(project.id, made["id"], "1/diff/?against=zero"))
    assert bad.status_code == 400 and "against" in bad.json()
    bad = api.post(versions_url(project.id, made["id"], "1/rollback/"), {"x": 1}, format="json")
    assert bad.status_code == 400
    assert AgentVersion.objects.filter(agent_id=made["id"]).count() == 1
    for path in ("", "1/", "1/diff/"):
        assert other_api.get(versions_url(project.id, made["id"], path)).status_code == 404
    assert (
        other_api.post(
            versions_url(project.id, made["id"], "1/rollback/"), {}, format="json"
        ).status_code
        == 404
    )
    # Pinning a version that is not the agent's writes nothing.
    chat = f"/my/projects/{project.id}/chat/"
    for value, code in ((7, 404), ("1", 400), (True, 400), (0, 400)):
        response = api.post(chat, {"agent_id": made["id"], "agent_version": value}, format="json")
        assert response.status_code == code, (value, response.content)
    assert api.get(chat).json()["total"] == 0


@pytest.mark.slow
def test_a_pinned_session_answers_with_its_version_and_runs_record_it(
    live_worker, api, project, made, redis_client, fake_openai
):
    url = f"{agents_url(project.id)}{made['id']}/"
    chat = f"/my/projects/{project.id}/chat/"
    pinned = api.post(chat, {"agent_id": made["id"], "agent_version": 1}, format="json")
    assert pinned.status_code == 201 and pinned.json()["agent_version"] == 1
    assert (
        api.patch(url, {"system_prompt": "Now verbose.", "model": "m-2"}, format="json").status_code
        == 200
    )
    live = api.post(chat, {"agent_id": made["id"]}, format="json").json()
    assert live["agent_version"] is None

    answers = {}
    for session in (pinned.json(), live):
        posted = api.post(f"{chat}{session['id']}/messages/", {"content": "hi"}, format="json")
        assert posted.status_code == 202, posted.content
        answer_id = posted.json()["assistant_message_id"]
        kind, data = wait_for_event(
            redis_client,
            project,
            session["id"],
            types={"message.completed", "message.error"},
            message_id=answer_id,
        )
        assert kind == "message.completed", data
        answers[session["id"]] = answer_id

    requests = [r["body"] for r in fake_openai.requests if r["path"].endswith("/chat/completions")]
    assert [r["model"] for r in requests] == ["m-1", "m-2"]
    assert requests[0]["messages"][0]["content"].startswith("Be brief.")
    assert requests[1]["messages"][0]["content"].startswith("Now verbose.")
    pinned_run = Run.objects.get(message_id=answers[pinned.json()["id"]])
    live_run = Run.objects.get(message_id=answers[live["id"]])
    assert pinned_run.agent_version.number == 1 and live_run.agent_version.number == 2
    runs = api.get(f"{chat}{live['id']}/runs/").json()
    assert runs["runs"][0]["agent_version"] == 2
