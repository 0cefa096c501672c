"""The tool loop end to end: real workers run the agent from the project's queue, the
OpenAI-protocol server asks for tool calls (one, several at once, forever), HTTP tools
call a local server, and the session's stream shows every step."""

from __future__ import annotations

import json
import logging

import pytest

from agents.models import ProjectSecret, Tool
from chat.engine import chat_run
from chat.models import Message, Run
from governance.models import RunUsage
from tests.factories import AgentFactory, ChatSessionFactory
from tests.runtime.conftest import stream_events, wait_for_event
from tests.runtime.test_chat import add_context, post_message
from tests.runtime.tool_server import ToolServer
from tools.http import ToolError, resolve_checked

pytestmark = pytest.mark.slow

SECRET = "tok-5f1e9c2d-very-secret"
ENDS = {"message.completed", "message.error", "message.cancelled"}


@pytest.fixture
def tool_server():
    server = ToolServer().start()
    yield server
    server.stop()


@pytest.fixture
def private_ok(runtime_settings):
    # The local tool server is on loopback, which tools may not call by default.
    runtime_settings.EGRESS_ALLOW_NETWORKS = {"tools": ["127.0.0.0/8"]}
    return runtime_settings


def model_agent(project, **params):
    return AgentFactory(project=project, model="gpt-local", params={"top_k": 0, **params})


def http_tool(agent, server, name="echo", path="/echo/{city}", **fields):
    return Tool.objects.create(
        agent=agent,
        kind="http",
        name=name,
        description="Calls the test server.",
        parameters={"type": "object", "properties": {"city": {"type": "string"}}},
        method=fields.pop("method", "GET"),
        url_template=server.url + path,
        **fields,
    )


def ask(api, redis_client, session, text):
    answer_id = post_message(api, session, text)["assistant_message_id"]
    kind, data = wait_for_event(
        redis_client, session.project, session.id, types=ENDS, message_id=answer_id
    )
    events = [(k, d) for _, k, d in stream_events(redis_client, session.project, session.id)]
    return kind, data, events, Message.objects.get(id=answer_id)


def of(events, kind):
    return [d for k, d in events if k == kind]


def test_one_http_tool_call_with_a_secret_that_never_shows(
    live_worker, api, project, redis_client, fake_openai, private_ok, tool_server, caplog
):
    caplog.set_level(logging.DEBUG)
    agent = model_agent(project)
    ProjectSecret.objects.create(project=project, name="API_KEY", value=SECRET)
    http_tool(agent, tool_server, headers={"Authorization": "Bearer {{secret:API_KEY}}"})
    session = ChatSessionFactory(agent=agent, project=project)
    fake_openai.turns = [{"tool_calls": [("echo", {"city": "Paris & Rome"})]}]

    kind, data, events, answer = ask(api, redis_client, session, "Weather?")
    assert kind == "message.completed", data
    assert answer.content == "Hello from the model."

    # The tool server got the call, with the secret in its header and the argument
    # percent-encoded into the path.
    (seen,) = tool_server.requests
    assert seen["headers"]["Authorization"] == f"Bearer {SECRET}"
    assert seen["path"] == "/echo/Paris%20%26%20Rome"

    kinds = [k for k, _ in events]
    assert kinds.count("run.step") == 2
    (call,) = of(events, "tool.call")
    (result,) = of(events, "tool.result")
    assert call["name"] == "echo" and json.loads(call["arguments"]) == {"city": "Paris & Rome"}
    assert result["ok"] is True and result["result"].startswith("HTTP 200")
    assert kinds.index("tool.call") < kinds.index("tool.result") < kinds.index("message.delta")
    assert "[secret]" in result["result"]  # the echoed header, scrubbed

    # The model got the call's result back, scrubbed too, after its own call.
    second = fake_openai.requests[-1]["body"]["messages"]
    assert second[-2]["tool_calls"][0]["function"]["name"] == "echo"
    assert second[-1]["role"] == "tool" and second[-1]["tool_call_id"] == call["call_id"]
    assert "[secret]" in second[-1]["content"]
    tools_offered = fake_openai.requests[0]["body"]["tools"]
    assert tools_offered[0]["function"]["name"] == "echo"

    run = Run.objects.get(message=answer)
    assert run.model == "gpt-local"
    assert [s["status"] for s in run.steps] == ["done"]
    # Nowhere: not the stream, the run, the API's answers, the LLM requests, the logs.
    everywhere = [
        json.dumps(events),
        json.dumps(run.steps),
        api.get(f"/my/projects/{project.id}/chat/{session.id}/messages/").content.decode(),
        api.get(f"/my/projects/{project.id}/agents/{agent.id}/tools/").content.decode(),
        api.get(f"/my/projects/{project.id}/secrets/").content.decode(),
        json.dumps(fake_openai.requests),
        caplog.text,
    ]
    for text in everywhere:
        assert SECRET not in text


def test_parallel_calls_run_at_once_and_all_results_go_back(
    live_worker, api, project, redis_client, fake_openai, private_ok, tool_server
):
    agent = model_agent(project)
    # /together answers only when two requests are in at once.
    http_tool(agent, tool_server, name="first", path="/together")
    http_tool(agent, tool_server, name="second", path="/together")
    session = ChatSessionFactory(agent=agent, project=project)
    fake_openai.turns = [{"tool_calls": [("first", {}), ("second", {"city": "Oslo"})]}]

    kind, data, events, _answer = ask(api, redis_client, session, "Both, please.")
    assert kind == "message.completed", data
    results = of(events, "tool.result")
    assert sorted(r["name"] for r in results) == ["first", "second"]
    assert all(r["ok"] and '"together": true' in r["result"] for r in results), results
    calls = of(events, "tool.call")
    assert len({c["call_id"] for c in calls}) == 2 and {c["step"] for c in calls} == {1}
    messages = fake_openai.requests[-1]["body"]["messages"]
    assert [m["role"] for m in messages[-3:]] == ["assistant", "tool", "tool"]
    assert len(messages[-3]["tool_calls"]) == 2


def test_the_step_limit_ends_the_run_in_error(
    live_worker, api, project, redis_client, fake_openai, private_ok, tool_server
):
    agent = model_agent(project, max_steps=3)
    http_tool(agent, tool_server)
    session = ChatSessionFactory(agent=agent, project=project)
    fake_openai.every_turn = {"tool_calls": [("echo", {"city": "again"})]}

    kind, data, events, answer = ask(api, redis_client, session, "Loop forever.")
    assert kind == "message.error"
    assert "step limit (3)" in data["error"] and answer.status == "error"
    assert len(of(events, "run.step")) == 3
    assert len(of(events, "tool.result")) == 2  # the last step's calls are not made
    assert len(fake_openai.requests) == 3


def test_a_tool_that_times_out_tells_the_model_and_the_run_goes_on(
    live_worker, api, project, redis_client, fake_openai, private_ok, tool_server
):
    agent = model_agent(project)
    http_tool(agent, tool_server, name="slow", path="/slow", timeout_seconds=0.3)
    session = ChatSessionFactory(agent=agent, project=project)
    fake_openai.turns = [{"tool_calls": [("slow", {})]}]

    kind, data, events, _answer = ask(api, redis_client, session, "Slowly?")
    assert kind == "message.completed", data
    (result,) = of(events, "tool.result")
    assert result["ok"] is False and "did not answer within 0.3s" in result["result"]
    assert fake_openai.requests[-1]["body"]["messages"][-1]["content"] == result["result"]


def test_a_response_larger_than_the_cap_is_cut(
    live_worker, api, project, redis_client, fake_openai, private_ok, tool_server
):
    private_ok.TOOL_RESPONSE_MAX_BYTES = 1000
    agent = model_agent(project)
    http_tool(agent, tool_server, name="big", path="/big")
    session = ChatSessionFactory(agent=agent, project=project)
    fake_openai.turns = [{"tool_calls": [("big", {})]}]

    kind, data, _events, _answer = ask(api, redis_client, session, "Big?")
    assert kind == "message.completed", data
    sent = fake_openai.requests[-1]["body"]["messages"][-1]["content"]
    assert sent.count("x") == 1000 and "[response cut at 1000 bytes]" in sent


def test_tools_may_not_call_private_addresses(
    live_worker, api, project, redis_client, fake_openai, tool_server
):
    agent = model_agent(project)
    http_tool(agent, tool_server)
    session = ChatSessionFactory(agent=agent, project=project)
    fake_openai.turns = [{"tool_calls": [("echo", {"city": "x"})]}]

    kind, data, events, _answer = ask(api, redis_client, session, "Reach inside?")
    assert kind == "message.completed", data
    (result,) = of(events, "tool.result")
    assert result["ok"] is False and "non-public address (127.0.0.1)" in result["result"]
    assert tool_server.requests == []  # nothing reached it


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", "localhost", "10.1.2.3", "192.168.0.1", "172.16.5.5", "169.254.169.254",
     "100.64.0.1", "0.0.0.0", "::1", "::ffff:127.0.0.1", "fe80::1", "fc00::1", "224.0.0.1"],
)  # fmt: skip
def test_ssrf_guard_refuses_non_public_addresses(runtime_settings, host):
    with pytest.raises(ToolError, match="non-public address"):
        resolve_checked(host, 80)


def test_ssrf_guard_lets_public_addresses_through(runtime_settings):
    assert resolve_checked("93.184.216.34", 443) == "93.184.216.34"
    assert resolve_checked("2606:4700::1111", 443) == "2606:4700::1111"


def test_offline_provider_uses_search_context_deterministically(
    live_worker, api, project, redis_client
):
    agent = AgentFactory(project=project, model="offline")
    Tool.objects.create(agent=agent, kind="builtin", name="search_context")
    session = ChatSessionFactory(agent=agent, project=project)
    add_context(api, agent, ["The office cat is called Barsik."])

    kind, data, events, answer = ask(api, redis_client, session, "What is the cat called?")
    assert kind == "message.completed", data
    (call,) = of(events, "tool.call")
    assert call["name"] == "search_context"
    assert json.loads(call["arguments"]) == {"query": "What is the cat called?"}
    (result,) = of(events, "tool.result")
    assert result["ok"] and "Barsik" in result["result"]
    assert "search_context tool found" in answer.content and "Barsik" in answer.content

    # No question, no search.
    kind, _data, events, _answer = ask(api, redis_client, session, "Thanks.")
    assert kind == "message.completed"
    assert len(of(events, "tool.call")) == 1


def test_add_context_tool_stores_what_the_model_gives_it(
    live_worker, api, project, redis_client, fake_openai
):
    agent = model_agent(project)
    Tool.objects.create(agent=agent, kind="builtin", name="add_context")
    Tool.objects.create(agent=agent, kind="builtin", name="search_context")
    session = ChatSessionFactory(agent=agent, project=project)
    fake_openai.turns = [
        {"tool_calls": [("add_context", {"text": "The deploy window is Friday 4pm."})]},
        {"tool_calls": [("search_context", {"query": "deploy window"})]},
    ]
    kind, data, events, _answer = ask(api, redis_client, session, "Remember and recall.")
    assert kind == "message.completed", data
    stored, found = of(events, "tool.result")
    assert stored["ok"] and json.loads(stored["result"])["stored_chunks"] == 1
    assert found["ok"] and "Friday 4pm" in found["result"]


def test_bad_calls_from_the_model_are_told_back_to_it(
    live_worker, api, project, redis_client, fake_openai, private_ok, tool_server
):
    agent = model_agent(project)
    tool = http_tool(agent, tool_server)
    tool.parameters = {**tool.parameters, "required": ["city"]}
    tool.save()
    session = ChatSessionFactory(agent=agent, project=project)
    fake_openai.turns = [{"tool_calls": [("nope", {}), ("echo", {"town": "x"})]}]
    kind, _data, events, _answer = ask(api, redis_client, session, "Go.")
    assert kind == "message.completed"
    missing, invalid = of(events, "tool.result")
    assert missing["result"] == "error: no such tool"
    assert "invalid arguments" in invalid["result"] and "'city' is a required" in invalid["result"]
    assert tool_server.requests == []


@pytest.mark.parametrize("repeatable", [False, True])
def test_a_run_restarted_after_a_tool_call_it_may_not_repeat_ends_saying_so(
    transactional_db, session, repeatable
):
    """The worker died during a call (its step says `started`): the recovery pass
    dispatches the run again. Starting over would call a non-repeatable tool twice."""
    run = Run.objects.create(
        session=session,
        message=Message.objects.create(session=session, role="assistant", status="pending"),
        agent=session.agent,
        starts=1,
        steps=[
            {"type": "tool", "name": "charge_card", "status": "started",
             "safe_to_repeat": repeatable, "attempt": 1, "step": 1},
        ],
    )  # fmt: skip
    Message.objects.create(session=session, role="user", content="hi")
    if repeatable:
        assert chat_run(run_id=run.id, attempt=run.attempt) == "done"
        return
    with pytest.raises(Exception, match=str(run.id)):
        chat_run(run_id=run.id, attempt=run.attempt)
    run.refresh_from_db()
    assert run.status == "error"
    assert "charge_card" in run.error and "may have taken effect" in run.error


def test_a_run_with_tools_is_accounted_as_all_its_provider_calls(
    live_worker, api, project, redis_client, fake_openai, private_ok, tool_server
):
    agent = model_agent(project)
    http_tool(agent, tool_server)
    session = ChatSessionFactory(agent=agent, project=project)
    fake_openai.turns = [{"tool_calls": [("echo", {"city": "Oslo"}), ("echo", {"city": "Rome"})]}]

    kind, data, _events, answer = ask(api, redis_client, session, "Weather in both?")
    assert kind == "message.completed", data
    usage = RunUsage.objects.get(message_id=answer.id)
    # Two provider calls (the one asking for the tools, the one answering), each
    # reporting the stub's usage; two tool calls.
    reported = fake_openai.usage
    assert len(fake_openai.requests) == 2
    assert usage.prompt_tokens == 2 * reported["prompt_tokens"]
    assert usage.completion_tokens == 2 * reported["completion_tokens"]
    assert usage.tool_calls == 2 and not usage.estimated
