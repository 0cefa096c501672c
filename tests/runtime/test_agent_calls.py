"""An agent asks another agent of its project over the bus: the callee's run is a task
on the project's queue, a child of the caller's run with its own session, messages and
events; depth and fan-out are limited; cancelling the caller or deleting the project
stops the whole tree; no agent reaches an agent of another project."""

from __future__ import annotations

import json

import pytest
from django.utils import timezone

from agents.models import Tool
from chat.lease import lease_keeper
from chat.models import ChatSession, Message, Run
from chat.services import AgentCallRefused, agent_call_start
from chat.suspend import runs_waiting_recover
from tests.factories import AgentFactory, ChatSessionFactory, ProjectFactory
from tests.runtime.conftest import stream_events, wait_for_event
from tests.runtime.test_chat import post_message
from tests.workers import wait_until

pytestmark = pytest.mark.slow

ENDS = {"message.completed", "message.error", "message.cancelled"}


def ask_tool(agent, target, name="ask"):
    return Tool.objects.create(agent=agent, kind="agent", name=name, target_agent=target)


def ended(redis_client, session, message_id):
    return wait_for_event(
        redis_client, session.project, session.id, types=ENDS, message_id=message_id
    )


def results(redis_client, session):
    events = stream_events(redis_client, session.project, session.id)
    return [d for _, k, d in events if k == "tool.result"]


def test_a_chain_of_two_agents_over_the_bus(live_worker, api, project, redis_client, fake_openai):
    caller = AgentFactory(project=project, name="caller", model="gpt-local")
    callee = AgentFactory(project=project, name="callee", model="offline")
    ask_tool(caller, callee)
    session = ChatSessionFactory(agent=caller, project=project)
    fake_openai.turns = [{"tool_calls": [("ask", {"message": "What do you hold?"})]}]

    answer_id = post_message(api, session, "Ask the callee.")["assistant_message_id"]
    kind, data = ended(redis_client, session, answer_id)
    assert kind == "message.completed", data

    parent = Run.objects.get(message_id=answer_id)
    (child,) = Run.objects.filter(parent=parent)
    assert child.depth == 1 and child.agent_id == callee.id and child.status == "done"
    assert child.session.agent_id == callee.id and child.session_id != session.id
    assert list(child.session.messages.values_list("role", "content")) == [
        ("user", "What do you hold?"),
        ("assistant", Message.objects.get(id=child.message_id).content),
    ]
    (result,) = results(redis_client, session)
    assert result["ok"] and result["child_run_id"] == str(child.id)
    assert result["child_session_id"] == str(child.session_id)
    assert "offline provider" in result["result"]
    # The callee's own events are on its own session's stream.
    child_kinds = [k for _, k, _ in stream_events(redis_client, project, child.session_id)]
    assert child_kinds[:2] == ["message.created", "message.created"]
    assert child_kinds[-1] == "message.completed"
    # The caller's model got the callee's answer.
    assert "offline provider" in fake_openai.requests[-1]["body"]["messages"][-1]["content"]
    runs = api.get(f"/my/projects/{project.id}/chat/{child.session_id}/runs/").json()["runs"]
    assert runs[0]["parent_id"] == str(parent.id) and runs[0]["depth"] == 1


def test_depth_limit(live_worker, api, project, redis_client, fake_openai, runtime_settings):
    runtime_settings.AGENT_CALL_MAX_DEPTH = 1
    a = AgentFactory(project=project, model="gpt-local")
    b = AgentFactory(project=project, model="gpt-local")
    c = AgentFactory(project=project, model="offline")
    ask_tool(a, b, "ask_b")
    ask_tool(b, c, "ask_c")
    session = ChatSessionFactory(agent=a, project=project)
    fake_openai.turns = [
        {"tool_calls": [("ask_b", {"message": "Ask C."})]},  # a
        {"tool_calls": [("ask_c", {"message": "Hello C."})]},  # b, one deep
    ]
    answer_id = post_message(api, session, "Go deep.")["assistant_message_id"]
    assert ended(redis_client, session, answer_id)[0] == "message.completed"
    (b_run,) = Run.objects.filter(parent__message_id=answer_id)
    (refused,) = results(redis_client, b_run.session)
    assert not refused["ok"] and "at most 1 deep" in refused["result"]
    assert not Run.objects.filter(agent=c).exists()


def test_fan_out_limit(live_worker, api, project, redis_client, fake_openai, runtime_settings):
    runtime_settings.AGENT_CALL_MAX_FANOUT = 1
    a = AgentFactory(project=project, model="gpt-local")
    b = AgentFactory(project=project, model="offline")
    ask_tool(a, b)
    session = ChatSessionFactory(agent=a, project=project)
    fake_openai.turns = [
        {"tool_calls": [("ask", {"message": "One?"}), ("ask", {"message": "Two?"})]}
    ]
    answer_id = post_message(api, session, "Twice.")["assistant_message_id"]
    assert ended(redis_client, session, answer_id)[0] == "message.completed"
    outcomes = sorted(r["ok"] for r in results(redis_client, session))
    assert outcomes == [False, True]
    refused = next(r for r in results(redis_client, session) if not r["ok"])
    assert "at most 1 times" in refused["result"]
    assert Run.objects.filter(parent__message_id=answer_id).count() == 1


@pytest.fixture
def tree(live_worker, api, project, redis_client, fake_openai):
    """A caller whose callee is in the middle of a slow answer."""
    fake_openai.mode, fake_openai.delay = "slow", 0.3
    fake_openai.tokens = [f"t{i} " for i in range(40)]
    caller = AgentFactory(project=project, model="gpt-local")
    callee = AgentFactory(project=project, model="gpt-local")
    ask_tool(caller, callee)
    session = ChatSessionFactory(agent=caller, project=project)
    fake_openai.turns = [{"tool_calls": [("ask", {"message": "Take your time."})]}]
    answer_id = post_message(api, session, "Ask slowly.")["assistant_message_id"]
    child = wait_until(
        lambda: Run.objects.filter(parent__message_id=answer_id, status="running").first(),
        what="the callee's run",
    )
    wait_for_event(
        redis_client, project, child.session_id, types={"message.delta"},
        message_id=child.message_id,
    )  # fmt: skip
    return session, Run.objects.get(message_id=answer_id), child


def test_cancel_stops_the_whole_tree(api, project, redis_client, tree):
    session, parent, child = tree
    response = api.post(f"/my/projects/{project.id}/chat/{session.id}/runs/{parent.id}/cancel/")
    assert response.status_code == 202, response.content
    assert ended(redis_client, child.session, child.message_id)[0] == "message.cancelled"
    assert ended(redis_client, session, parent.message_id)[0] == "message.cancelled"
    both = Run.objects.filter(id__in=[parent.id, child.id])
    wait_until(
        lambda: set(both.values_list("status", flat=True)) == {"cancelled"},
        what="both runs cancelled",
    )


def test_delete_during_a_tree_stops_everything(api, project, redis_client, fake_openai, tree):
    session, parent, child = tree
    assert api.delete(f"/my/projects/{project.id}/").status_code == 204
    asked = len(fake_openai.requests)
    # Both runs stop once they see their project gone; after that none can call a model.
    wait_until(lambda: not lease_keeper().held(), what="the worker done with both runs")
    assert len(fake_openai.requests) == asked  # no model call after the 204
    assert not Run.objects.filter(id__in=[parent.id, child.id]).exists()
    assert not ChatSession.objects.filter(project=project).exists()


def test_no_agent_reaches_an_agent_of_another_project(api, project, user):
    caller = AgentFactory(project=project)
    foreign = AgentFactory(project=ProjectFactory(owner=user))
    url = f"/my/projects/{project.id}/agents/{caller.id}/tools/"
    response = api.post(
        url, {"kind": "agent", "name": "ask", "target_agent_id": str(foreign.id)}, format="json"
    )
    assert response.status_code == 404 and "target_agent_id" in response.json()
    assert not Tool.objects.exists()

    # Nor at run time, whatever a tool row says.
    session = ChatSessionFactory(agent=caller, project=project)
    message = Message.objects.create(session=session, role="assistant", status="streaming")
    run = Run.objects.create(session=session, message=message, agent=caller, status="running")
    with pytest.raises(AgentCallRefused, match="no such agent in this project"):
        agent_call_start(parent_run_id=run.id, target_agent_id=str(foreign.id), content="hi")
    assert not Run.objects.filter(parent=run).exists()


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"kind": "agent", "name": "ask"}, "target_agent_id"),
        ({"kind": "agent", "name": "ask", "target_agent_id": "self"}, "target_agent_id"),
        ({"kind": "agent", "name": "ask", "target_agent_id": 5}, "target_agent_id"),
        ({"kind": "builtin", "name": "add_context", "target_agent_id": "other"}, "target_agent_id"),
        ({"kind": "agent", "name": "ask", "target_agent_id": "other", "method": "GET"}, "method"),
    ],
)
def test_bad_agent_tools_are_400(api, project, body, field):
    caller, other = AgentFactory(project=project), AgentFactory(project=project)
    ids = {"self": str(caller.id), "other": str(other.id)}
    body = {k: ids.get(v, v) if isinstance(v, str) else v for k, v in body.items()}
    response = api.post(f"/my/projects/{project.id}/agents/{caller.id}/tools/", body, format="json")
    assert response.status_code == 400, response.content
    assert field in response.json()
    assert not Tool.objects.exists()


def test_an_agent_tool_is_listed_with_its_target(api, project):
    caller, other = AgentFactory(project=project), AgentFactory(project=project)
    body = {"kind": "agent", "name": "ask", "target_agent_id": str(other.id)}
    url = f"/my/projects/{project.id}/agents/{caller.id}/tools/"
    tool = api.post(url, body, format="json").json()
    assert tool["target_agent_id"] == str(other.id)
    assert tool["parameters"]["required"] == ["message"]
    assert json.dumps(tool)  # serialisable as the schema says


# --- The caller waits stored, holding no worker slot (chat.suspend) ---------------------


def test_the_caller_waits_stored_while_its_callee_answers(
    api, project, redis_client, fake_openai, tree
):
    session, parent, child = tree
    parent.refresh_from_db()
    # Stored: no worker holds it, no lease; only the callee's run is held.
    assert parent.status == "waiting" and parent.lease_expires_at is None
    assert parent.suspended["reason"] == "agents"
    assert parent.suspended["children"] == {parent.steps[0]["call_id"]: str(child.id)}
    assert [h.run_id for h in lease_keeper().held()] == [child.id]
    waiting = wait_for_event(
        redis_client, project, session.id, types={"run.waiting"}, message_id=parent.message_id
    )[1]
    assert waiting["reason"] == "agents"
    assert waiting["calls"][0]["child_run_id"] == str(child.id)
    # The callee's end resumes it (a new attempt, on any worker) with the answer. The
    # rest of both answers need not be slow: what the test looks at is seen.
    fake_openai.delay = 0.0
    kind, _ = wait_for_event(
        redis_client, project, session.id, types=ENDS, message_id=parent.message_id, timeout=60
    )
    assert kind == "message.completed"
    parent.refresh_from_db()
    assert parent.status == "done" and parent.attempt == 2
    (result,) = results(redis_client, session)
    assert result["ok"] and result["child_run_id"] == str(child.id)


def test_more_callers_than_worker_slots_all_get_their_answers(
    live_worker, api, project, redis_client, fake_openai, runtime_settings
):
    """Four callers on a worker of two threads: a caller that held its thread while its
    callee waited in the queue would leave no thread for the callees (until the call
    timed out); stored, each caller lets its thread go to its callee."""
    runtime_settings.AGENT_CALL_TIMEOUT_SECONDS = 15
    callee = AgentFactory(project=project, name="callee", model="offline")
    fake_openai.first_turn = {"tool_calls": [("ask", {"message": "Your answer?"})]}
    sessions = []
    for i in range(4):
        caller = AgentFactory(project=project, name=f"caller{i}", model="gpt-local")
        ask_tool(caller, callee)
        sessions.append(ChatSessionFactory(agent=caller, project=project))
    answers = [post_message(api, s, "Ask.")["assistant_message_id"] for s in sessions]
    for session, answer_id in zip(sessions, answers, strict=True):
        kind, data = ended(redis_client, session, answer_id)
        assert kind == "message.completed", data
        (result,) = results(redis_client, session)
        assert result["ok"] and "offline provider" in result["result"], result
    callers = Run.objects.filter(message_id__in=answers)
    assert set(callers.values_list("status", flat=True)) == {"done"}
    assert Run.objects.filter(parent__in=callers, status="done").count() == 4


def test_a_callee_cancelled_alone_resumes_its_caller(api, project, redis_client, tree):
    session, parent, child = tree
    wait_until(
        lambda: Run.objects.filter(id=parent.id, status="waiting").exists(),
        what="the caller stored",
    )
    response = api.post(
        f"/my/projects/{project.id}/chat/{child.session_id}/runs/{child.id}/cancel/"
    )
    assert response.status_code == 202, response.content
    assert ended(redis_client, session, parent.message_id)[0] == "message.completed"
    (result,) = results(redis_client, session)
    assert not result["ok"] and "cancelled" in result["result"]


def test_a_caller_past_its_deadline_goes_on_without_the_answer(api, project, redis_client, tree):
    session, parent, child = tree
    wait_until(
        lambda: Run.objects.filter(id=parent.id, status="waiting").exists(),
        what="the caller stored",
    )
    # Its deadline (AGENT_CALL_TIMEOUT_SECONDS after it was stored) passes.
    Run.objects.filter(id=parent.id).update(waiting_until=timezone.now())
    assert runs_waiting_recover()["waits_expired"] == 1
    assert ended(redis_client, child.session, child.message_id)[0] == "message.cancelled"
    kind, _ = wait_for_event(
        redis_client, project, session.id, types=ENDS, message_id=parent.message_id, timeout=60
    )
    assert kind == "message.completed"
    (result,) = results(redis_client, session)
    assert not result["ok"] and "cancelled" in result["result"]
