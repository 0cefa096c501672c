"""Tool calls that need their owner's approval: the run is stored (`waiting`), its
worker lets it go, and an approval (arguments as written or edited) or a reject resumes
it from that step on a worker; timeout, cancel and project delete end it cleanly; the
recovery pass leaves it alone; bad input is a 4xx that changes nothing; another user's
run is a 404."""

from __future__ import annotations

import json

import pytest

from agentbus import MAINTENANCE_QUEUE
from agents.models import ProjectSecret, Tool
from chat.dispatch import runs_recover
from chat.lease import lease_keeper
from chat.models import Message, Run
from chat.suspend import runs_waiting_recover
from config.celery_app import app
from governance.models import RunUsage
from tests.factories import AgentFactory, ChatSessionFactory, ProjectFactory
from tests.runtime.conftest import stream_events, wait_for_event
from tests.runtime.test_chat import post_message
from tests.workers import wait_until

pytestmark = pytest.mark.slow

ENDS = {"message.completed", "message.error", "message.cancelled"}
SECRET = "tok-approval-very-secret-7"


def approval_agent(project, **tool_fields):
    agent = AgentFactory(project=project, model="gpt-local", params={"top_k": 0})
    Tool.objects.create(
        agent=agent, kind="builtin", name="search_context", requires_approval=True, **tool_fields
    )
    return agent


def url(project, run, action):
    return f"/my/projects/{project.id}/runs/{run.id}/{action}/"


def waiting_run(api, redis_client, project, fake_openai, *, arguments=None, text="Search."):
    agent = approval_agent(project)
    session = ChatSessionFactory(agent=agent, project=project)
    fake_openai.turns = [
        {"tool_calls": [("search_context", arguments or {"query": "the weather"})]}
    ]
    answer_id = post_message(api, session, text)["assistant_message_id"]
    # The first run of a test process loads the embedding model: on a loaded machine,
    # more than the default 20 s.
    kind, data = wait_for_event(
        redis_client, project, session.id, types={"run.waiting"}, message_id=answer_id,
        timeout=90,
    )  # fmt: skip
    run = Run.objects.get(message_id=answer_id)
    wait_until(lambda: not lease_keeper().held(), what="the worker let the run go")
    return session, run, data


def ended(redis_client, session, run):
    return wait_for_event(
        redis_client, session.project, session.id, types=ENDS, message_id=run.message_id
    )


def test_a_call_waits_holding_no_worker_then_is_approved(
    live_worker, api, project, redis_client, fake_openai
):
    ProjectSecret.objects.create(project=project, name="KEY", value=SECRET)
    session, run, waiting = waiting_run(
        api, redis_client, project, fake_openai, arguments={"query": f"about {SECRET}"}
    )
    # The event names the call, its arguments scrubbed of the project's secrets.
    (call,) = waiting["calls"]
    assert waiting["reason"] == "approval" and call["name"] == "search_context"
    assert call["requires_approval"] and SECRET not in json.dumps(waiting)
    assert json.loads(call["arguments"]) == {"query": "about [secret]"}
    run.refresh_from_db()
    assert run.status == "waiting" and run.lease_expires_at is None and run.worker == ""
    assert [s["status"] for s in run.steps] == ["awaiting-approval"]
    assert len(fake_openai.requests) == 1  # nothing more until it is approved
    # The API shows what it waits for; the recovery pass leaves it alone.
    shown = api.get(f"/my/projects/{project.id}/chat/{session.id}/runs/{run.id}/").json()
    assert shown["status"] == "waiting" and shown["waiting"]["call_ids"] == [call["call_id"]]
    attempt = run.attempt
    runs_recover(budget=5)
    runs_waiting_recover()
    run.refresh_from_db()
    assert run.status == "waiting" and run.attempt == attempt

    response = api.post(url(project, run, "approve"), {}, format="json")
    assert response.status_code == 202, response.content
    kind, data = ended(redis_client, session, run)
    assert kind == "message.completed", data
    run.refresh_from_db()
    assert run.status == "done" and run.suspended["decision"]["approved"] is True
    assert [s["status"] for s in run.steps] == ["done"]
    # The model got the call's result after its own call, and answered.
    second = fake_openai.requests[-1]["body"]["messages"]
    assert second[-2]["tool_calls"][0]["function"]["name"] == "search_context"
    assert second[-1]["role"] == "tool" and second[-1]["content"].startswith("[")
    kinds = [k for _, k, _ in stream_events(redis_client, project, session.id)]
    assert kinds.index("run.waiting") < kinds.index("run.resumed") < kinds.index("tool.result")
    # Counted once: one usage row for the run (both attempts' provider calls in it).
    (usage,) = RunUsage.objects.filter(run_id=run.id)
    assert usage.recorded_attempt == run.attempt
    # Decided already: a second decision is a 409.
    assert api.post(url(project, run, "approve"), {}, format="json").status_code == 409


def test_approved_with_edited_arguments_checked_against_the_schema(
    live_worker, api, project, redis_client, fake_openai
):
    session, run, waiting = waiting_run(api, redis_client, project, fake_openai)
    call_id = waiting["calls"][0]["call_id"]
    for bad in (
        {"arguments": {"k": 3}},  # `query` is required
        {"arguments": {"query": 5}},
        {"arguments": "not an object"},
        {"arguments": {"query": "x"}, "call_id": "nope"},
        {"unknown": 1},
    ):
        response = api.post(url(project, run, "approve"), bad, format="json")
        assert response.status_code == 400, (bad, response.content)
    run.refresh_from_db()
    assert run.status == "waiting" and not run.suspended.get("decision")

    edited = {"query": "the edited question", "k": 2}
    response = api.post(
        url(project, run, "approve"), {"arguments": edited, "call_id": call_id}, format="json"
    )
    assert response.status_code == 202, response.content
    assert ended(redis_client, session, run)[0] == "message.completed"
    asked = fake_openai.requests[-1]["body"]["messages"][-2]["tool_calls"][0]
    assert json.loads(asked["function"]["arguments"]) == edited
    run.refresh_from_db()
    assert run.steps[0]["edited"] is True


def test_rejected_the_model_is_told_why(live_worker, api, project, redis_client, fake_openai):
    session, run, _waiting = waiting_run(api, redis_client, project, fake_openai)
    assert api.post(url(project, run, "reject"), {}, format="json").status_code == 400
    assert api.post(url(project, run, "reject"), {"reason": " "}, format="json").status_code == 400
    response = api.post(url(project, run, "reject"), {"reason": "not today"}, format="json")
    assert response.status_code == 202, response.content
    assert ended(redis_client, session, run)[0] == "message.completed"
    told = fake_openai.requests[-1]["body"]["messages"][-1]
    assert told["role"] == "tool" and "rejected" in told["content"]
    assert "not today" in told["content"]


def test_cancel_ends_a_waiting_run(live_worker, api, project, redis_client, fake_openai):
    session, run, _waiting = waiting_run(api, redis_client, project, fake_openai)
    response = api.post(f"/my/projects/{project.id}/chat/{session.id}/runs/{run.id}/cancel/")
    assert response.status_code == 202, response.content
    assert ended(redis_client, session, run)[0] == "message.cancelled"
    assert Run.objects.get(id=run.id).status == "cancelled"
    assert api.post(url(project, run, "approve"), {}, format="json").status_code == 409
    # The session takes the next message at once.
    fake_openai.turns = []
    answer_id = post_message(api, session, "Again.")["assistant_message_id"]
    kind, _ = wait_for_event(redis_client, project, session.id, types=ENDS, message_id=answer_id)
    assert kind == "message.completed"


def test_timeout_ends_a_waiting_run(
    live_worker, api, project, redis_client, fake_openai, runtime_settings
):
    runtime_settings.RUN_APPROVAL_TIMEOUT_SECONDS = 0.5
    session, run, waiting = waiting_run(api, redis_client, project, fake_openai)
    assert waiting["waiting_until"]
    wait_until(
        lambda: runs_waiting_recover()["waits_expired"] == 1 or None, what="the wait to expire"
    )
    kind, data = ended(redis_client, session, run)
    assert kind == "message.error" and "not approved within" in data["error"]
    assert Message.objects.get(id=run.message_id).status == "error"


def test_project_delete_removes_a_waiting_run(live_worker, api, project, redis_client, fake_openai):
    _session, run, _waiting = waiting_run(api, redis_client, project, fake_openai)
    assert api.delete(f"/my/projects/{project.id}/").status_code == 204
    assert not Run.objects.filter(id=run.id).exists()
    assert runs_waiting_recover() == {"waits_expired": 0, "waits_resumed": 0}


def test_another_users_run_is_a_404_and_unknown_runs_too(
    live_worker, api, other_api, project, redis_client, fake_openai, other_user
):
    _session, run, _waiting = waiting_run(api, redis_client, project, fake_openai)
    for action, body in (("approve", {}), ("reject", {"reason": "no"})):
        assert other_api.post(url(project, run, action), body, format="json").status_code == 404
        theirs = ProjectFactory(owner=other_user)
        assert other_api.post(url(theirs, run, action), body, format="json").status_code == 404
    run.refresh_from_db()
    assert run.status == "waiting" and not run.suspended.get("decision")


def test_a_run_that_waits_for_nothing_is_a_409(live_worker, api, project, redis_client):
    agent = AgentFactory(project=project, model="offline")
    session = ChatSessionFactory(agent=agent, project=project)
    answer_id = post_message(api, session, "Hi")["assistant_message_id"]
    wait_for_event(redis_client, project, session.id, types=ENDS, message_id=answer_id)
    run = Run.objects.get(message_id=answer_id)
    response = api.post(url(project, run, "approve"), {}, format="json")
    assert response.status_code == 409, response.content


def test_waiting_runs_hold_no_slot_and_resume_on_another_worker_process(
    transactional_db, api, project, redis_client, worker_process, fake_openai, tmp_path
):
    """Real worker processes (the Procfile's thread pool): while three runs wait for
    approval the worker runs no task (its own `inspect active`); it is SIGKILLed, another
    process starts, and the approved runs end there."""
    env = {
        "OPENAI_BASE_URL": fake_openai.base_url,
        "OPENAI_API_KEY": "test-key",
        "QDRANT_PATH": str(tmp_path / "qdrant"),
    }
    pool = ("-Q", MAINTENANCE_QUEUE, "--pool=threads", "--concurrency=10")
    agent = approval_agent(project)
    fake_openai.first_turn = {"tool_calls": [("search_context", {"query": "x"})]}
    sessions = [ChatSessionFactory(agent=agent, project=project) for _ in range(3)]
    answers = [post_message(api, s, "Search.")["assistant_message_id"] for s in sessions]
    runs = Run.objects.filter(message_id__in=answers)
    # Started after the messages: it follows the project's queue from its start.
    first = worker_process(*pool, env=env)
    first.wait_ready()
    wait_until(lambda: runs.filter(status="waiting").count() == 3, timeout=90, what="3 waiting")

    def active() -> list:
        return (
            app.control.inspect(destination=[first.name], timeout=2, limit=1).active() or {}
        ).get(first.name)

    assert wait_until(lambda: active() is not None and active() == [], what="no task active")
    first.kill_group()
    second = worker_process(*pool, env=env)
    second.wait_ready()
    for run in runs:
        assert api.post(url(project, run, "approve"), {}, format="json").status_code == 202
    wait_until(lambda: runs.filter(status="done").count() == 3, timeout=60, what="3 done")
    # Each run names the process that ended it (host:pid).
    workers = set(runs.values_list("worker", flat=True))
    assert {w.rpartition(":")[2] for w in workers} == {str(second.pid)}, workers
