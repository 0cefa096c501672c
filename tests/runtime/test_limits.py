"""Limits that bind in the pool the Procfile runs (threads, where Celery's task time
limits do nothing, celery#9203): an agent run keeps its own deadline, and its provider
calls get at most what is left of it."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from django.utils import timezone

from agents.models import Tool
from chat.dispatch import runs_recover
from chat.models import Message, Run
from context.embeddings import get_embedder
from context.vectorstore import get_vector_store
from tests.factories import AgentFactory, ChatSessionFactory, ProjectFactory
from tests.runtime.conftest import stream_events
from tests.runtime.tool_server import ToolServer
from tests.workers import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]


@pytest.fixture(autouse=True)
def _warm_embedder():
    """What a worker loads once (the bundled model, the store, the OpenAI client) is
    loaded before, not in the short limits' time."""
    import llm.openai_api  # noqa: F401  (here on purpose: the warm-up loads the OpenAI client)

    get_embedder().query("warm up")
    get_vector_store().open()


def post(api, session, content="Tell me something long") -> int:
    url = f"/my/projects/{session.project_id}/chat/{session.id}/messages/"
    response = api.post(url, {"content": content}, format="json")
    assert response.status_code == 202, response.content
    return response.json()["assistant_message_id"]


@pytest.mark.parametrize("mode", ["slow", "stall"])
def test_a_run_past_its_time_limit_ends_in_error_saying_so(
    live_worker, api, user, fake_openai, runtime_settings, redis_client, mode
):
    """`slow`: a 15 s answer streaming; `stall`: the endpoint sends one token and then
    nothing while holding the connection (its read timeout is 30 s). Either way the run
    ends in error at its limit, saying so, and the client is told."""
    runtime_settings.RUN_TIME_LIMIT_SECONDS = 3
    runtime_settings.LLM_TIMEOUT_SECONDS = 30
    fake_openai.mode, fake_openai.delay = mode, 0.3
    fake_openai.tokens = [f"w{i} " for i in range(50)]  # 15 s
    project = ProjectFactory(owner=user)
    session = ChatSessionFactory(
        agent=AgentFactory(project=project, model="gpt-local"), project=project
    )
    started = time.monotonic()
    answer_id = post(api, session)
    answer = wait_until(
        lambda: Message.objects.filter(id=answer_id, status__in=Message.FINISHED).first(),
        timeout=40,
        what="the answer ended",
    )
    elapsed = time.monotonic() - started
    assert answer.status == "error", (answer.status, answer.content)
    assert answer.error == "the agent run reached its time limit (3s)"
    assert answer.content.startswith("w0 ")  # what was said before the limit stays
    assert elapsed < 12, elapsed  # neither the whole answer (15 s) nor the read timeout
    # The end commits first; the lease goes once its end event is written.
    wait_until(
        lambda: Run.objects.get(message_id=answer_id).lease_expires_at is None,
        what="the run's end event written and its lease released",
    )
    assert Run.objects.get(message_id=answer_id).status == "error"
    kinds = [k for _, k, _ in stream_events(redis_client, project, session.id)]
    assert kinds.count("message.error") == 1 and "message.completed" not in kinds


def test_a_tool_call_gets_only_what_is_left_of_the_run(
    live_worker, api, user, fake_openai, runtime_settings, redis_client
):
    """A tool whose own timeout (30 s) outlasts the run: the call is cut at the run's
    deadline, and the run ends in error at its limit instead of waiting it out."""
    runtime_settings.TOOLS_ALLOW_PRIVATE_NETWORKS = True
    # Room for the first turn on a loaded machine, far below the tool's 20 s.
    runtime_settings.RUN_TIME_LIMIT_SECONDS = 3.5
    server = ToolServer().start()
    server.slow_seconds = 20
    try:
        project = ProjectFactory(owner=user)
        agent = AgentFactory(project=project, model="gpt-local", params={"top_k": 0})
        Tool.objects.create(
            agent=agent,
            kind="http",
            name="slow",
            description="Takes its time.",
            parameters={"type": "object", "properties": {}},
            method="GET",
            url_template=server.url + "/slow",
            timeout_seconds=30,
        )
        session = ChatSessionFactory(agent=agent, project=project)
        fake_openai.turns = [{"tool_calls": [("slow", {})]}]
        started = time.monotonic()
        answer_id = post(api, session, "Slowly?")
        answer = wait_until(
            lambda: Message.objects.filter(id=answer_id, status__in=Message.FINISHED).first(),
            timeout=40,
            what="the answer ended",
        )
        elapsed = time.monotonic() - started
    finally:
        server.stop()
    assert answer.status == "error", (answer.status, answer.content)
    assert answer.error == "the agent run reached its time limit (3.5s)"
    assert elapsed < 12, elapsed  # not the tool's 20 s
    steps = Run.objects.get(message_id=answer_id).steps
    tool_steps = [s for s in steps if s["type"] == "tool"]
    assert len(tool_steps) == 1, steps
    step = tool_steps[0]
    assert step["status"] == "error" and "did not answer within" in step["result"]


def test_the_recovery_pass_keeps_its_own_time_limit(api, user, settings):
    """Celery's time limits do not bind the recovery pass in the thread pool: it stops
    between runs once its own budget is spent, and the next pass goes on."""
    project = ProjectFactory(owner=user)
    agent = AgentFactory(project=project)
    answers = [post(api, ChatSessionFactory(agent=agent, project=project)) for _ in range(3)]
    # Their worker died: claimed, leases long gone.
    Run.objects.filter(message_id__in=answers).update(
        status="running", starts=1, lease_expires_at=timezone.now() - timedelta(seconds=1)
    )
    spent = runs_recover(budget=0)
    assert spent["unfinished"] == 1 and spent["restarted"] == 0
    assert Run.objects.filter(message_id__in=answers, status="running").count() == 3
    assert runs_recover(budget=60)["restarted"] == 3
    assert not Run.objects.filter(message_id__in=answers, status="running").exists()
