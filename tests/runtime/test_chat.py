"""Chat end to end: the API stores the message, a real worker runs the agent from the
project's queue, the answer streams into the session's Redis Stream and ends in the DB."""

from __future__ import annotations

import itertools
from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from agents.models import Tool
from chat import streams
from chat.dispatch import runs_recover
from chat.engine import chat_run
from chat.lease import lease_keeper
from chat.models import Message, Run
from chat.state import run_end
from chat.streams import stream_key
from chat.tasks import run_agent
from context.embeddings import get_embedder
from context.vectors import context_search
from context.vectorstore import TenantScope, get_vector_store, shared_collection_name
from tests.factories import AgentFactory, ChatSessionFactory, ProjectFactory
from tests.runtime.conftest import queued_task_names, stream_events, wait_for_event
from tests.workers import wait_until
from workspaces.redis import scoped, workspace_prefix

pytestmark = pytest.mark.slow


def messages_url(session):
    return f"/my/projects/{session.project_id}/chat/{session.id}/messages/"


def post_message(api, session, content):
    response = api.post(messages_url(session), {"content": content}, format="json")
    assert response.status_code == 202, response.content
    return response.json()


def add_context(api, agent, documents):
    url = f"/my/projects/{agent.project_id}/agents/{agent.id}/context/"
    response = api.post(url, {"documents": documents}, format="json")
    assert response.status_code == 202, response.content
    job_id = response.json()["job_id"]

    def finished():
        job = api.get(f"{url}jobs/{job_id}/").json()
        return job if job["status"] in ("done", "error") else None

    job = wait_until(finished, what="context job")
    assert job["status"] == "done", job
    return job


def test_offline_answer_streams_from_context_and_is_stored(live_worker, api, session, redis_client):
    agent = session.agent
    add_context(
        api,
        agent,
        [
            "The office cat is called Barsik and sleeps on the server rack.",
            {"text": "Invoices are paid on the 5th of each month.", "metadata": {"src": "wiki"}},
        ],
    )
    body = post_message(api, session, "What is the name of the office cat?")
    assert body["role"] == "user" and body["content"] == "What is the name of the office cat?"
    answer_id = body["assistant_message_id"]

    kind, data = wait_for_event(
        redis_client,
        session.project,
        session.id,
        types={"message.completed", "message.error"},
        message_id=answer_id,
    )
    assert kind == "message.completed", data
    answer = Message.objects.get(id=answer_id)
    assert answer.status == "done" and answer.role == "assistant"
    assert "offline provider" in answer.content
    assert "Barsik" in answer.content  # the nearest context made it into the answer

    events = stream_events(redis_client, session.project, session.id)
    kinds = [k for _, k, _ in events]
    # Both messages announced first, then the deltas, then the completion.
    assert kinds[:2] == ["message.created", "message.created"]
    assert events[0][2]["role"] == "user" and events[1][2]["id"] == answer_id
    assert events[1][2]["status"] == "pending"
    assert kinds[-1] == "message.completed" and set(kinds[2:-1]) == {"message.delta"}
    deltas = [d for _, k, d in events if k == "message.delta"]
    assert "".join(d["delta"] for d in deltas) == answer.content
    offsets = [d["offset"] for d in deltas]
    assert offsets == sorted(offsets) and offsets[0] == 0
    ids = [eid for eid, _, _ in events]
    assert ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-"))))

    # The exchange joined the agent's context memory.
    url = f"/my/projects/{agent.project_id}/agents/{agent.id}/context/"
    hits = api.get(url, {"q": "office cat name", "k": 10}).json()["results"]
    assert any(h["kind"] == "exchange" and "office cat" in h["text"] for h in hits)
    # It is remembered by the vector the run searched with: the question embedded once.
    embedder = get_embedder()
    points, _ = get_vector_store().scroll(
        TenantScope.agent(
            user_id=agent.project.owner_id, project_id=agent.project_id, agent_id=agent.id
        ),
        collection=shared_collection_name(model=embedder.name, dim=embedder.dim),
    )
    (exchange,) = [p for p in points if p.payload["kind"] == "exchange"]
    assert exchange.payload["embedded_as"] == "query"
    expected = embedder.query("What is the name of the office cat?")
    assert max(abs(a - b) for a, b in zip(exchange.vector, expected, strict=True)) < 1e-4


def test_a_redelivered_run_of_a_finished_message_does_nothing(
    live_worker, api, session, redis_client
):
    body = post_message(api, session, "hello")
    answer_id = body["assistant_message_id"]
    wait_for_event(
        redis_client, session.project, session.id, types={"message.completed"}, message_id=answer_id
    )
    before = stream_events(redis_client, session.project, session.id)
    run = Run.objects.get(message_id=answer_id)
    assert chat_run(run_id=run.id, attempt=run.attempt) == "stale"
    assert stream_events(redis_client, session.project, session.id) == before
    assert Message.objects.get(id=answer_id).status == "done"


def test_a_run_whose_worker_died_mid_stream_starts_over_and_says_so(
    transactional_db, api, session, redis_client, settings
):
    """A worker died while streaming: its lease runs out, the recovery pass dispatches the
    run again, and the new start tells the client (message.restarted) before its deltas,
    which begin again at offset 0."""
    answer_id = post_message(api, session, "question")["assistant_message_id"]
    run = Run.objects.get(message_id=answer_id)
    # What the dead worker left: the run claimed (lease long gone), half an answer out.
    Run.objects.filter(id=run.id).update(
        status="running", starts=1, lease_expires_at=timezone.now() - timedelta(seconds=1)
    )
    Message.objects.filter(id=answer_id).update(status="streaming")
    streams.event_append(
        redis=scoped(session.project.owner_id, session.project_id),
        session_id=session.id,
        event_type="message.delta",
        data={"message_id": answer_id, "delta": "half an ans", "offset": 0},
    )
    assert chat_run(run_id=run.id, attempt=run.attempt) == "stale"  # not queued

    assert runs_recover()["restarted"] == 1
    run.refresh_from_db()
    assert run.status == "queued" and run.attempt == 2
    assert chat_run(run_id=run.id, attempt=1) == "stale"  # the old dispatch may not
    assert chat_run(run_id=run.id, attempt=2) == "done"

    answer = Message.objects.get(id=answer_id)
    assert answer.status == "done" and "offline provider" in answer.content
    events = [(k, d) for _, k, d in stream_events(redis_client, session.project, session.id)]
    kinds = [k for k, _ in events]
    assert kinds.count("message.restarted") == 1 and kinds.count("message.completed") == 1
    after = events[kinds.index("message.restarted") + 1 :]
    deltas = [d for k, d in after if k == "message.delta"]
    assert deltas[0]["offset"] == 0
    assert "".join(d["delta"] for d in deltas) == answer.content


def test_a_run_whose_rows_are_gone_ends_quietly(transactional_db, api, session, redis_client):
    answer_id = post_message(api, session, "hello")["assistant_message_id"]
    run = Run.objects.get(message_id=answer_id)
    session.delete()
    assert chat_run(run_id=run.id, attempt=run.attempt) == "gone"


def test_openai_provider_streams_the_models_tokens(
    live_worker, api, user, redis_client, fake_openai
):
    project = ProjectFactory(owner=user)
    agent = AgentFactory(
        project=project,
        model="gpt-local",
        system_prompt="You are terse.",
        params={"temperature": 0.1, "max_tokens": 64, "top_k": 2},
    )
    session = ChatSessionFactory(agent=agent, project=project)
    add_context(api, agent, ["Deploys happen on Tuesdays after the stand-up."])
    body = post_message(api, session, "When do deploys happen?")
    kind, data = wait_for_event(
        redis_client,
        project,
        session.id,
        types={"message.completed", "message.error"},
        message_id=body["assistant_message_id"],
    )
    assert kind == "message.completed", data
    assert data["content"] == "Hello from the model."
    deltas = [
        d["delta"]
        for _, k, d in stream_events(redis_client, project, session.id)
        if k == "message.delta"
    ]
    # The first token at once; the rest joined per CHAT_DELTA_WINDOW_SECONDS.
    assert deltas[0] == fake_openai.tokens[0]
    assert "".join(deltas) == "".join(fake_openai.tokens)
    request = fake_openai.requests[-1]["body"]
    assert request["model"] == "gpt-local" and request["stream"] is True
    assert request["temperature"] == 0.1 and request["max_tokens"] == 64
    assert "top_k" not in request  # retrieval's parameter, not the model's
    system = request["messages"][0]
    assert system["role"] == "system" and system["content"].startswith("You are terse.")
    assert "Deploys happen on Tuesdays" in system["content"]
    assert request["messages"][-1] == {"role": "user", "content": "When do deploys happen?"}


@pytest.mark.parametrize("mode", ["error", "down", "stall"])
def test_provider_failure_becomes_an_error_event_and_message(
    live_worker, api, user, redis_client, fake_openai, runtime_settings, mode
):
    if mode == "down":
        runtime_settings.OPENAI_BASE_URL = "http://127.0.0.1:9/v1"  # nothing listens there
    elif mode == "stall":
        runtime_settings.LLM_TIMEOUT_SECONDS = 1
    fake_openai.mode = mode if mode != "down" else "ok"
    project = ProjectFactory(owner=user)
    agent = AgentFactory(project=project, model="gpt-local")
    session = ChatSessionFactory(agent=agent, project=project)
    body = post_message(api, session, "Are you there?")
    answer_id = body["assistant_message_id"]
    kind, data = wait_for_event(
        redis_client,
        project,
        session.id,
        types={"message.completed", "message.error"},
        message_id=answer_id,
    )
    assert kind == "message.error", data
    answer = Message.objects.get(id=answer_id)
    assert answer.status == "error"
    expected = {
        "error": "HTTP 500",
        "down": "could not be reached",
        "stall": "did not answer within 1s",
    }[mode]
    assert expected in answer.error and data["error"] == answer.error
    if mode == "stall":
        assert answer.content == "Hello"  # what arrived before the stall is kept


@pytest.mark.parametrize("part", ["text", "tool call"])
def test_an_endless_answer_is_cut_off_at_llm_answer_max_chars(
    live_worker, api, user, redis_client, fake_openai, runtime_settings, part
):
    """A project's own endpoint can be anyone's server: one that streams without end
    (text, or a tool call's arguments) ends the call in error at LLM_ANSWER_MAX_CHARS,
    instead of filling the worker's memory until the run's deadline."""
    runtime_settings.LLM_ANSWER_MAX_CHARS = 50_000
    project = ProjectFactory(owner=user)
    agent = AgentFactory(project=project, model="gpt-local")
    if part == "text":
        fake_openai.tokens = itertools.repeat("x" * 1000)
    else:
        Tool.objects.create(agent=agent, kind="builtin", name="search_context")
        fake_openai.every_turn = {"tool_calls": [("search_context", {"query": "x" * 60_000})]}
    session = ChatSessionFactory(agent=agent, project=project)
    body = post_message(api, session, "Say everything.")
    kind, data = wait_for_event(
        redis_client, project, session.id, types={"message.completed", "message.error"},
        message_id=body["assistant_message_id"],
    )  # fmt: skip
    assert kind == "message.error", data
    assert "passed 50000 characters" in data["error"], data
    answer = Message.objects.get(id=body["assistant_message_id"])
    assert answer.status == "error" and len(answer.content) <= 50_000
    assert len(fake_openai.requests) == 1  # not tried again


def test_an_answer_with_a_nul_character_is_stored_without_it(
    live_worker, api, session, redis_client, fake_openai
):
    """PostgreSQL's text and jsonb refuse NUL; a model (or a tool) that produced one
    failed the write of the run's end, and no end event came (30 s)."""
    session.agent.model = "gpt-local"
    session.agent.save()
    fake_openai.tokens = ["Hello", "\u0000", " world"]
    body = post_message(api, session, "Hi")
    kind, data = wait_for_event(
        redis_client, session.project, session.id, types={"message.completed", "message.error"},
        message_id=body["assistant_message_id"],
    )  # fmt: skip
    assert kind == "message.completed", data
    assert Message.objects.get(id=body["assistant_message_id"]).content == "Hello world"


def test_cancel_stops_a_streaming_run(live_worker, api, user, redis_client, fake_openai):
    fake_openai.mode, fake_openai.delay = "slow", 0.2
    fake_openai.tokens = [f"t{i} " for i in range(50)]
    project = ProjectFactory(owner=user)
    session = ChatSessionFactory(
        agent=AgentFactory(project=project, model="gpt-local"), project=project
    )
    answer_id = post_message(api, session, "Tell me a long story")["assistant_message_id"]
    wait_for_event(redis_client, project, session.id, types={"message.delta"}, message_id=answer_id)

    url = f"/my/projects/{project.id}/chat/{session.id}/cancel/"
    response = api.post(url)
    assert response.status_code == 202 and response.json() == {"cancelled": [answer_id]}
    kind, _ = wait_for_event(
        redis_client,
        project,
        session.id,
        types={"message.completed", "message.error", "message.cancelled"},
        message_id=answer_id,
        timeout=5,
    )
    assert kind == "message.cancelled"
    answer = Message.objects.get(id=answer_id)
    assert answer.status == "cancelled" and Run.objects.get(message=answer).status == "cancelled"
    wait_until(
        lambda: Message.objects.get(id=answer_id).content.startswith("t0 "),
        what="the part said before the cancel kept",
    )
    # The worker lets the run go once its provider stream is closed: from then on no
    # token of it can reach the stream any more.
    wait_until(lambda: not lease_keeper().held(), what="the run's worker done with it")
    events = stream_events(redis_client, project, session.id)
    kinds = [k for _, k, d in events if d.get("message_id") in (answer_id, None)]
    assert kinds[-1] == "message.cancelled"
    answer.refresh_from_db()
    deltas = "".join(d["delta"] for _, k, d in events if k == "message.delta")
    assert answer.content == deltas and len(deltas) < len("".join(fake_openai.tokens))
    # Nothing is in flight any more: a second cancel stops nothing.
    again = api.post(url)
    assert again.status_code == 200 and again.json() == {"cancelled": []}


def test_cancel_before_the_run_starts(transactional_db, api, session, redis_client):
    """Without a worker the answer stays pending; cancel ends it at once."""
    answer_id = post_message(api, session, "hi")["assistant_message_id"]
    assert "agents.run_agent" in queued_task_names(session.project_id)
    response = api.post(f"/my/projects/{session.project_id}/chat/{session.id}/cancel/")
    assert response.status_code == 202 and response.json() == {"cancelled": [answer_id]}
    answer = Message.objects.get(id=answer_id)
    assert answer.status == "cancelled"
    kinds = [k for _, k, _ in stream_events(redis_client, session.project, session.id)]
    assert kinds == ["message.created", "message.created", "message.cancelled"]
    # The run, when a worker gets to it, finds it ended.
    run = Run.objects.get(message_id=answer_id)
    assert chat_run(run_id=run.id, attempt=run.attempt) == "stale"


def test_cancel_of_a_foreign_session_is_404(api, other_user, transactional_db):
    theirs = ChatSessionFactory(agent=AgentFactory(project=ProjectFactory(owner=other_user)))
    response = api.post(f"/my/projects/{theirs.project_id}/chat/{theirs.id}/cancel/")
    assert response.status_code == 404


def test_bad_message_enqueues_nothing(transactional_db, api, session, redis_client):
    response = api.post(messages_url(session), {"content": ""}, format="json")
    assert response.status_code == 400
    assert Message.objects.count() == 0
    assert "agents.run_agent" not in queued_task_names(session.project_id)
    assert stream_events(redis_client, session.project, session.id) == []


def test_deleting_a_session_removes_its_stream(transactional_db, api, session, redis_client):
    post_message(api, session, "hi")
    assert stream_events(redis_client, session.project, session.id)
    url = f"/my/projects/{session.project_id}/chat/{session.id}/"
    assert api.delete(url).status_code == 204
    assert stream_events(redis_client, session.project, session.id) == []


def _answered(redis_client, session, answer_id) -> Message:
    kind, data = wait_for_event(
        redis_client,
        session.project,
        session.id,
        types={"message.completed", "message.error"},
        message_id=answer_id,
    )
    assert kind == "message.completed", data
    return Message.objects.get(id=answer_id)


def test_regenerate_leaves_only_the_standing_exchange_in_memory(
    live_worker, api, session, redis_client
):
    """The answer regenerate replaced is out of the conversation, and out of the agent's
    memory too: asked again, the nearest exchange is the one that stands."""
    question = "Which colour is the sky over the office?"
    first = post_message(api, session, question)["assistant_message_id"]
    _answered(redis_client, session, first)
    url = f"/my/projects/{session.project_id}/chat/{session.id}/regenerate/"
    response = api.post(url)
    assert response.status_code == 202, response.content
    second = response.json()["id"]
    _answered(redis_client, session, second)
    assert Message.objects.get(id=first).status == "superseded"

    def exchanges():
        hits = context_search(
            user_id=session.project.owner_id,
            project_id=session.project_id,
            agent_id=str(session.agent_id),
            query=question,
            k=10,
        )
        return [h.payload["message_id"] for h in hits if h.payload.get("kind") == "exchange"]

    assert wait_until(lambda: exchanges() == [second], what="only the standing exchange")


@pytest.mark.parametrize("searches", [False, True], ids=["context", "search-tool"])
def test_offline_answers_stay_readable_turn_after_turn(
    live_worker, api, session, redis_client, searches
):
    """Each offline answer quotes what the agent remembers, which holds its earlier
    offline answers: quoted whole, they nested one more level (and, through the search
    tool, one more layer of raw JSON) every turn."""
    if searches:
        Tool.objects.create(agent=session.agent, kind="builtin", name="search_context")
    answer = None
    for turn in range(6):
        body = post_message(api, session, f"What did we say about the cat, turn {turn}?")
        answer = _answered(redis_client, session, body["assistant_message_id"])
    content = answer.content
    assert content.count("This is the offline provider") == 1, content
    assert '{"text"' not in content and '\\"' not in content, content
    assert len(content) < 2500, len(content)


@pytest.mark.parametrize("status", ["done", "error", "cancelled"])
def test_an_end_whose_event_was_not_written_is_written_by_the_recovery_pass(
    transactional_db, api, session, redis_client, settings, status
):
    """The run's end committed, then its event could not be written (Redis refused it;
    a worker killed at that moment leaves the same): the run keeps a lease while its
    event is owed, and once the lease is out the recovery pass writes the event, once,
    so a live client is told how the answer ended."""
    settings.RUN_LEASE_SECONDS = 0.2
    answer_id = post_message(api, session, "question")["assistant_message_id"]
    run = Run.objects.select_related("session__project").get(message_id=answer_id)
    Run.objects.filter(id=run.id).update(status="running", starts=1)
    Message.objects.filter(id=answer_id).update(status="streaming")
    key = workspace_prefix(session.project.owner_id, session.project_id) + stream_key(session.id)
    kept = redis_client.xrange(key)
    redis_client.delete(key)
    redis_client.set(key, "not a stream")  # every XADD on it fails (WRONGTYPE)

    error = "the model is overloaded" if status == "error" else ""
    assert run_end(run=run, status=status, content="All done.", error=error)
    assert Message.objects.get(id=answer_id).status == status  # the database has it
    redis_client.delete(key)
    for entry_id, fields in kept:
        redis_client.xadd(key, fields, id=entry_id)
    assert not [k for _, k, _ in stream_events(redis_client, session.project, session.id)
                if k.startswith("message.") and k != "message.created"]  # fmt: skip

    expected = {"done": "message.completed", "error": "message.error"}.get(
        status, "message.cancelled"
    )

    def written():
        runs_recover()
        events = stream_events(redis_client, session.project, session.id)
        return [(k, d) for _, k, d in events if k == expected]

    (event,) = wait_until(written, timeout=10, what="the end event written")
    assert event[1]["message_id"] == answer_id
    if status == "done":
        assert event[1]["content"] == "All done." and event[1]["status"] == "done"
    if status == "error":
        assert event[1]["error"] == error
    # The lease goes just after the event is written.
    wait_until(
        lambda: Run.objects.get(id=run.id).lease_expires_at is None, what="the lease released"
    )
    runs_recover()  # written once
    kinds = [k for _, k, _ in stream_events(redis_client, session.project, session.id)]
    assert kinds.count(expected) == 1


def test_a_run_dispatched_while_an_older_one_of_its_session_is_active_waits(
    transactional_db, api, session
):
    """One answer at a time per session, checked by the claim itself: a run whose task
    arrives while an older run of its session has not ended does not start; it waits
    undispatched until the older one ends (whose end dispatches it)."""
    first = post_message(api, session, "One.")["assistant_message_id"]
    second = post_message(api, session, "Two.")["assistant_message_id"]
    one, two = Run.objects.get(message_id=first), Run.objects.get(message_id=second)
    Run.objects.filter(id=two.id).update(dispatched_at=timezone.now())  # a dispatch arrived
    assert chat_run(run_id=two.id, attempt=two.attempt) == "waiting"
    two.refresh_from_db()
    assert (two.status, two.starts, two.dispatched_at) == ("queued", 0, None)
    assert chat_run(run_id=one.id, attempt=one.attempt) == "done"
    assert chat_run(run_id=two.id, attempt=two.attempt) == "done"
    two.refresh_from_db()
    assert (two.status, two.starts) == ("done", 1)


def test_a_chat_run_asks_the_database_few_statements(
    transactional_db, api, project, fake_openai, settings
):
    """What a worker asks PostgreSQL for one answer (claim, read, answer, end, usage,
    next run), counted: each statement costs the worker's one process CPU (about 1 ms to
    compile), which bounds how many runs it keeps in flight (bench/run_cpu.py)."""
    # The workspace's periodic check against the database (one more statement when it
    # falls due) is left out of the count: due every hour here, not every 0.5 s.
    settings.WORKSPACE_REVALIDATE_SECONDS = 3600
    session = ChatSessionFactory(
        agent=AgentFactory(project=project, model="gpt-local"), project=project
    )
    warm, measured = (
        Run.objects.get(message_id=post_message(api, session, q)["assistant_message_id"])
        for q in ("One.", "Two.")
    )
    kwargs = {"user_id": project.owner_id, "project_id": str(project.id)}
    run_agent.run(**kwargs, run_id=str(warm.id), attempt=warm.attempt)
    with CaptureQueriesContext(connection) as queries:
        run_agent.run(**kwargs, run_id=str(measured.id), attempt=measured.attempt)
    assert Run.objects.get(id=measured.id).status == "done"
    # 18 statements and the end's BEGIN and COMMIT (24 and 2 before they were cut).
    assert len(queries) <= 20, "\n".join(q["sql"][:120] for q in queries.captured_queries)
