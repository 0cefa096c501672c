"""SIGTERM hands work back: a worker as the Procfile starts it (threads pool,
REMAP_SIGTERM=SIGQUIT, a soft-shutdown window) that is stopped while it streams answers
from a slow endpoint stops them at a safe point within the window, puts them back to
queued with their leases released, and exits; another worker answers them, going on
from the last step whose tool calls were made."""

from __future__ import annotations

import time

import pytest

from agentbus import MAINTENANCE_QUEUE
from agents.models import Tool
from chat.dispatch import runs_recover
from chat.models import Message, Run
from tests.factories import AgentFactory, ChatSessionFactory, ProjectFactory
from tests.runtime.conftest import stream_events
from tests.runtime.tool_server import ToolServer
from tests.workers import wait_for, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

WINDOW = 10  # CELERY_WORKER_SOFT_SHUTDOWN_TIMEOUT of the worker under test


def post(api, session, content="Tell me something long") -> int:
    url = f"/my/projects/{session.project_id}/chat/{session.id}/messages/"
    response = api.post(url, {"content": content}, format="json")
    assert response.status_code == 202, response.content
    return response.json()["assistant_message_id"]


def test_sigterm_hands_runs_in_flight_back_and_exits_within_the_window(
    api, user, worker_process, fake_openai, tmp_path, redis_client
):
    fake_openai.mode, fake_openai.delay = "slow", 0.5
    fake_openai.tokens = [f"w{i} " for i in range(60)]  # a 30 s answer
    project = ProjectFactory(owner=user)
    agent = AgentFactory(project=project, model="gpt-local")
    sessions = [ChatSessionFactory(agent=agent, project=project) for _ in range(3)]
    env = {
        "OPENAI_BASE_URL": fake_openai.base_url,
        "OPENAI_API_KEY": "test-key",
        "CELERY_WORKER_SOFT_SHUTDOWN_TIMEOUT": str(WINDOW),
        "QDRANT_PATH": str(tmp_path / "qdrant"),
    }
    first = worker_process("-Q", MAINTENANCE_QUEUE, "-P", "threads", "-c", "8", env=env)
    first.wait_started()
    answers = [post(api, session) for session in sessions]

    def streaming(answer_id, session) -> bool:
        return Message.objects.get(id=answer_id).status == "streaming" and any(
            k == "message.delta" and d.get("message_id") == answer_id
            for _, k, d in stream_events(redis_client, project, session.id)
        )

    for answer_id, session in zip(answers, sessions, strict=True):
        wait_until(lambda a=answer_id, s=session: streaming(a, s), what="the answers streaming")

    stopped_at = time.monotonic()
    first.terminate()  # SIGTERM; REMAP_SIGTERM=SIGQUIT as in the Procfile
    code = first.wait(WINDOW + 20)
    exit_seconds = time.monotonic() - stopped_at
    log = first.log()
    assert code is not None, f"the worker did not exit:\n{log}"
    print(f"SIGTERM to exit: {exit_seconds:.2f}s (window {WINDOW}s, answers 30s)")
    assert exit_seconds < WINDOW, (exit_seconds, log)
    assert "CRITICAL" not in log and "kill_job" not in log, log

    for answer_id in answers:
        run = Run.objects.get(message_id=answer_id)
        assert (run.status, run.attempt, run.lease_expires_at) == ("queued", 2, None)
        assert Message.objects.get(id=answer_id).status == "pending"

    second = worker_process("-Q", MAINTENANCE_QUEUE, "-P", "threads", "-c", "8", env=env)
    second.wait_started()
    fake_openai.delay = 0.0

    def answered() -> bool:
        runs_recover()  # beat's job
        done = Message.objects.filter(id__in=answers, status__in=Message.FINISHED)
        # The end commits before its event is written (chat.state.run_end): a client
        # that saw the message finished sees the event a moment later.
        return done.count() == len(answers) and all(
            "message.completed" in [k for _, k, _ in stream_events(redis_client, project, s.id)]
            for s in sessions
        )

    assert wait_for(answered, timeout=60, interval=0.5), list(
        Message.objects.filter(id__in=answers).values_list("id", "status", "error")
    )
    for answer_id, session in zip(answers, sessions, strict=True):
        answer = Message.objects.get(id=answer_id)
        assert answer.status == "done" and answer.content == "".join(fake_openai.tokens)
        kinds = [k for _, k, _ in stream_events(redis_client, project, session.id)]
        assert kinds.count("message.restarted") == 1 and kinds.count("message.completed") == 1


@pytest.mark.parametrize("approved", [False, True], ids=["called", "approved-then-called"])
def test_a_run_handed_back_after_a_call_not_to_repeat_goes_on_from_its_result(
    api, user, worker_process, fake_openai, tmp_path, redis_client, approved
):
    """SIGTERM while a run makes a call that may not be repeated (`safe_to_repeat`
    false; or one its owner approved, the run resumed to make it): the call ends inside
    the window, the run is handed back at the next safe point keeping the call's result,
    and the next worker goes on from the step after it (the call made once, the model
    told its result) instead of refusing to go on."""
    tools = ToolServer().start()
    tools.slow_seconds = 2  # well inside the window
    try:
        project = ProjectFactory(owner=user)
        agent = AgentFactory(project=project, model="gpt-local")
        Tool.objects.create(
            agent=agent, kind="http", name="book", method="POST",
            url_template=tools.url + "/slow", safe_to_repeat=False, requires_approval=approved,
        )  # fmt: skip
        session = ChatSessionFactory(agent=agent, project=project)
        fake_openai.turns = [{"tool_calls": [("book", {})]}]
        env = {
            "OPENAI_BASE_URL": fake_openai.base_url,
            "OPENAI_API_KEY": "test-key",
            "CELERY_WORKER_SOFT_SHUTDOWN_TIMEOUT": str(WINDOW),
            "EGRESS_ALLOW_NETWORKS_TOOLS": "127.0.0.0/8",
            "QDRANT_PATH": str(tmp_path / "qdrant"),
        }
        first = worker_process("-Q", MAINTENANCE_QUEUE, "-P", "threads", "-c", "4", env=env)
        first.wait_started()
        answer_id = post(api, session, "Book it.")
        if approved:
            wait_until(
                lambda: Run.objects.get(message_id=answer_id).status == "waiting",
                what="the call awaiting approval",
            )
            run = Run.objects.get(message_id=answer_id)
            approve = f"/my/projects/{project.id}/runs/{run.id}/approve/"
            assert api.post(approve, {}, format="json").status_code == 202
        wait_until(lambda: len(tools.requests) == 1, what="the call in flight")
        first.terminate()  # SIGTERM; REMAP_SIGTERM=SIGQUIT as in the Procfile
        assert first.wait(WINDOW + 20) is not None, first.log()
        run = Run.objects.get(message_id=answer_id)
        assert run.status == "queued", (run.status, run.error, first.log())
        assert (run.suspended["reason"], run.suspended["step"]) == ("handed-back", 1)
        assert [c["name"] for c in run.suspended["calls"]] == ["book"]

        second = worker_process("-Q", MAINTENANCE_QUEUE, "-P", "threads", "-c", "4", env=env)
        second.wait_started()

        def answered() -> bool:
            runs_recover()  # beat's job
            return Message.objects.get(id=answer_id).status in Message.FINISHED

        assert wait_for(answered, timeout=60, interval=0.5)
    finally:
        tools.stop()
    run = Run.objects.get(message_id=answer_id)
    assert run.status == "done", run.error
    assert len(tools.requests) == 1  # made once
    # The model was asked again with the call's result in the conversation.
    last = fake_openai.requests[-1]["body"]["messages"]
    assert [m["role"] for m in last[-2:]] == ["assistant", "tool"]
    assert last[-2]["tool_calls"][0]["function"]["name"] == "book"
