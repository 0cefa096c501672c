"""Runs as objects: listed and read with their steps, cancelled one at a time, an answer
regenerated, and each busy policy for a message that arrives while an answer is in
flight; real workers, the OpenAI-protocol server streaming slowly where a run must be
caught in flight."""

from __future__ import annotations

import pytest

from agents.models import Agent, Tool
from chat.models import Message, Run
from tests.factories import AgentFactory, ChatSessionFactory
from tests.runtime.conftest import stream_events, wait_for_event
from tests.runtime.test_chat import post_message
from tests.workers import wait_until

pytestmark = pytest.mark.slow

ENDS = {"message.completed", "message.error", "message.cancelled"}


def chat_url(session, tail=""):
    return f"/my/projects/{session.project_id}/chat/{session.id}/{tail}"


def ended(redis_client, session, message_id):
    return wait_for_event(
        redis_client, session.project, session.id, types=ENDS, message_id=message_id
    )


def started(redis_client, session, message_id):
    wait_for_event(
        redis_client, session.project, session.id, types={"message.delta"}, message_id=message_id
    )


@pytest.fixture
def slow_model(fake_openai):
    fake_openai.mode = "slow"
    fake_openai.delay = 0.4
    return fake_openai


def model_session(project, busy_policy="enqueue"):
    agent = AgentFactory(project=project, model="gpt-local", busy_policy=busy_policy)
    return ChatSessionFactory(agent=agent, project=project)


def test_runs_list_and_detail_show_status_model_steps_and_timings(
    live_worker, api, project, redis_client
):
    agent = AgentFactory(project=project, model="offline")
    Tool.objects.create(agent=agent, kind="builtin", name="search_context")
    session = ChatSessionFactory(agent=agent, project=project)
    answer_id = post_message(api, session, "Anything about cats?")["assistant_message_id"]
    assert ended(redis_client, session, answer_id)[0] == "message.completed"

    listing = api.get(chat_url(session, "runs/")).json()
    assert listing["total"] == 1
    (run,) = listing["runs"]
    assert run["message_id"] == answer_id and run["status"] == "done"
    assert run["model"] == "offline" and run["starts"] == 1 and run["error"] == ""
    assert run["started_at"] <= run["finished_at"]
    (step,) = run["steps"]
    assert step["name"] == "search_context" and step["status"] == "done"
    assert api.get(chat_url(session, f"runs/{run['id']}/")).json() == run


def test_a_run_of_another_session_is_404(api, project):
    session, other = model_session(project), model_session(project)
    message = Message.objects.create(session=other, role="assistant", status="pending")
    run = Run.objects.create(session=other, message=message, agent=other.agent)
    assert api.get(chat_url(session, f"runs/{run.id}/")).status_code == 404
    assert api.post(chat_url(session, f"runs/{run.id}/cancel/")).status_code == 404
    assert Run.objects.get(id=run.id).status == "queued"


def test_cancel_one_run(live_worker, api, project, redis_client, slow_model):
    session = model_session(project)
    answer_id = post_message(api, session, "Talk slowly.")["assistant_message_id"]
    started(redis_client, session, answer_id)
    run = Run.objects.get(message_id=answer_id)

    response = api.post(chat_url(session, f"runs/{run.id}/cancel/"))
    assert response.status_code == 202, response.content
    assert response.json()["cancelled"] is True and response.json()["run"]["status"] == "cancelled"
    assert ended(redis_client, session, answer_id)[0] == "message.cancelled"
    again = api.post(chat_url(session, f"runs/{run.id}/cancel/"))
    assert again.status_code == 200 and again.json()["cancelled"] is False
    wait_until(lambda: Message.objects.get(id=answer_id).status == "cancelled")


def test_regenerate_answers_the_last_question_again(
    live_worker, api, project, redis_client, fake_openai
):
    session = model_session(project)
    assert api.post(chat_url(session, "regenerate/")).status_code == 409  # nothing asked

    first = post_message(api, session, "Say hello.")["assistant_message_id"]
    assert ended(redis_client, session, first)[0] == "message.completed"
    fake_openai.tokens = ["Hi", " again."]

    response = api.post(chat_url(session, "regenerate/"))
    assert response.status_code == 202, response.content
    second = response.json()["id"]
    assert response.json()["status"] == "pending" and second != first
    kind, data = ended(redis_client, session, second)
    assert kind == "message.completed" and data["content"] == "Hi again."

    assert Message.objects.get(id=first).status == "superseded"
    # The model was asked the question alone: the superseded answer is not in it.
    messages = fake_openai.requests[-1]["body"]["messages"]
    assert [m["role"] for m in messages] == ["system", "user"]
    assert Run.objects.filter(session=session).count() == 2
    listed = api.get(chat_url(session, "messages/")).json()["messages"]
    assert [m["status"] for m in listed] == ["done", "superseded", "done"]


def test_regenerate_is_409_while_an_answer_is_in_flight(
    live_worker, api, project, redis_client, slow_model
):
    session = model_session(project)
    answer_id = post_message(api, session, "Talk slowly.")["assistant_message_id"]
    started(redis_client, session, answer_id)
    response = api.post(chat_url(session, "regenerate/"))
    assert response.status_code == 409 and response.json()["code"] == "nothing_to_regenerate"
    assert Message.objects.filter(session=session).count() == 2
    assert ended(redis_client, session, answer_id)[0] == "message.completed"


def test_enqueue_answers_the_second_message_after_the_first(
    live_worker, api, project, redis_client, slow_model
):
    session = model_session(project, busy_policy=Agent.BusyPolicy.ENQUEUE)
    first = post_message(api, session, "One.")["assistant_message_id"]
    second = post_message(api, session, "Two.")["assistant_message_id"]
    assert ended(redis_client, session, first)[0] == "message.completed"
    assert ended(redis_client, session, second)[0] == "message.completed"
    one, two = Run.objects.get(message_id=first), Run.objects.get(message_id=second)
    assert two.started_at >= one.finished_at
    # The second answer follows the first: the model saw it.
    roles = [m["role"] for m in slow_model.requests[-1]["body"]["messages"]]
    assert roles == ["system", "user", "assistant", "user"]


def test_reject_refuses_a_message_while_an_answer_is_in_flight(
    live_worker, api, project, redis_client, slow_model
):
    session = model_session(project, busy_policy=Agent.BusyPolicy.REJECT)
    first = post_message(api, session, "One.")["assistant_message_id"]
    response = api.post(chat_url(session, "messages/"), {"content": "Two."}, format="json")
    assert response.status_code == 409, response.content
    assert response.json()["code"] == "session_busy"
    assert Message.objects.filter(session=session).count() == 2  # nothing written
    assert ended(redis_client, session, first)[0] == "message.completed"
    # Once it ended, messages are taken again.
    assert post_message(api, session, "Three.")["content"] == "Three."


def test_interrupt_cancels_the_answer_in_flight(
    live_worker, api, project, redis_client, slow_model
):
    session = model_session(project, busy_policy=Agent.BusyPolicy.INTERRUPT)
    first = post_message(api, session, "One.")["assistant_message_id"]
    started(redis_client, session, first)
    second = post_message(api, session, "Two.")["assistant_message_id"]
    assert ended(redis_client, session, first)[0] == "message.cancelled"
    assert ended(redis_client, session, second)[0] == "message.completed"
    assert Run.objects.get(message_id=first).status == "cancelled"
    kinds = [k for _, k, d in stream_events(redis_client, project, session.id)]
    assert kinds.count("message.completed") == 1
