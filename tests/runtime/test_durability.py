"""Every accepted message is answered, or ends in a clear error, whatever dies: Redis
(restarted empty, or from its append-only file), the broker at POST time, a worker
killed mid-answer or mid-tool-call. Faults are real: a Redis server and worker
processes of the test's own, stopped and killed."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from datetime import timedelta

import psycopg
import pytest
from celery.signals import task_failure
from celery.worker import state as worker_state
from django.db import connection
from django.utils import timezone

from agentbus import MAINTENANCE_QUEUE
from agents.models import Tool
from chat import events as sse
from chat import streams
from chat.dispatch import runs_recover
from chat.engine import AgentRunFailed, chat_run
from chat.lease import lease_keeper
from chat.models import Message, Run
from common.redis import get_redis
from context import job_records
from context.vectorstore import TenantScope, get_vector_store
from tests.factories import AgentFactory, ChatSessionFactory, ProjectFactory
from tests.runtime.conftest import stream_events, token_for, wait_for_event
from tests.runtime.test_sse import completed, events_url, read_sse
from tests.runtime.tool_server import ToolServer
from tests.workers import database_url, wait_for, wait_until
from workspaces.models import WorkspaceTeardown
from workspaces.redis import scoped, workspace_prefix

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

# The lease of the runs of the workers these tests kill: a killed worker's run is taken
# back after it (a worker renews every third of it). With 2 s, the live worker that took
# the run over once missed its renewals on a loaded machine (the whole suite on two
# cores), and its run was taken back a second time.
LEASE_SECONDS = 5


def post(api, session, content="Hello?") -> int:
    url = f"/my/projects/{session.project_id}/chat/{session.id}/messages/"
    response = api.post(url, {"content": content}, format="json")
    assert response.status_code == 202, response.content
    return response.json()["assistant_message_id"]


END_EVENTS = ("message.completed", "message.error", "message.cancelled")


def finished(message_ids) -> bool:
    """Every message ended, in the database and on its session's stream: the end commits
    before its event is written (chat.state.run_end), so a client that saw the message
    finished sees the event a moment later."""
    done = list(
        Message.objects.filter(id__in=message_ids, status__in=Message.FINISHED).select_related(
            "session__project"
        )
    )
    return len(done) == len(message_ids) and all(
        any(
            kind in END_EVENTS and data.get("message_id") == message.id
            for _, kind, data in stream_events(
                _redis(), message.session.project, message.session_id
            )
        )
        for message in done
    )


def recover_until_finished(message_ids, timeout=60.0) -> None:
    """Run the recovery pass (beat's job) until every message has ended."""

    def settled():
        runs_recover()
        return finished(message_ids)

    assert wait_for(settled, timeout=timeout, interval=0.5), list(
        Message.objects.filter(id__in=message_ids).values_list("id", "status", "error")
    )


def aof_synced(server) -> None:
    """Every write so far is on disk in the append-only file, when the server keeps one:
    WAITAOF waits for this client's own last write, which the file holds after all the
    writes that came before it."""
    if server.mode != "aof":
        return
    client = server.client()
    client.set("test:aof-mark", 1)
    client.delete("test:aof-mark")
    assert client.execute_command("WAITAOF", 1, 0, 10_000)[0] == 1


def completions(session) -> dict[int, int]:
    counts: dict[int, int] = {}
    for _, kind, data in stream_events(_redis(), session.project, session.id):
        if kind == "message.completed":
            counts[data["message_id"]] = counts.get(data["message_id"], 0) + 1
    return counts


def _redis():
    return get_redis()


@pytest.fixture
def worker(worker_process, tmp_path):
    """A worker process as the Procfile runs one (the shared pool, one prefork process),
    against this test's Redis and database, with a vector store of its own (local mode
    lets one process open a folder): start it with `worker()`."""

    def start():
        env = {"QDRANT_PATH": str(tmp_path / "qdrant")}
        proc = worker_process("-Q", MAINTENANCE_QUEUE, "-P", "prefork", "-c", "1", env=env)
        proc.wait_started()
        return proc

    return start


@pytest.fixture
def chat(user):
    project = ProjectFactory(owner=user)
    return ChatSessionFactory(agent=AgentFactory(project=project), project=project)


def test_messages_posted_while_redis_is_down_are_accepted_and_answered(
    own_redis, api, chat, worker
):
    worker()
    first = post(api, chat)
    wait_until(lambda: finished([first]), what="the first answer")

    own_redis.kill()
    down = [post(api, chat, f"while down {i}") for i in range(3)]  # 202, not 500
    assert Run.objects.filter(message_id__in=down, status="queued").count() == 3
    reads = api.get(f"/my/projects/{chat.project_id}/chat/{chat.id}/messages/")
    assert reads.status_code == 200

    own_redis.start()
    recover_until_finished(down)

    for message in Message.objects.filter(id__in=down):
        assert message.status == "done" and "offline provider" in message.content
    assert all(n == 1 for n in completions(chat).values())


def test_queued_messages_lost_with_redis_are_answered_once(own_redis, api, chat, worker):
    queued = [post(api, chat, f"question {i}") for i in range(4)]  # no worker yet
    # One answer at a time per session: the first is on the bus, the others wait for it.
    runs = Run.objects.filter(message_id__in=queued).order_by("created_at")
    assert [run.dispatched_at is not None for run in runs] == [True, False, False, False]
    aof_synced(own_redis)
    own_redis.kill()
    own_redis.start()

    worker()
    recover_until_finished(queued)

    runs = Run.objects.filter(message_id__in=queued)
    assert {r.status for r in runs} == {"done"}
    assert {r.starts for r in runs} == {1}
    if own_redis.mode == "aof":
        # The queue came back from the file: nothing needed dispatching again.
        assert {r.attempt for r in runs} == {1}
        assert completions(chat) == dict.fromkeys(queued, 1)
    else:
        # The first: the lost dispatch, then the recovery's. The others waited for it:
        # each dispatched when the one before it ended, or by a recovery pass that got
        # there first (a second attempt; the first then finds itself stale).
        in_order = sorted(runs, key=lambda r: r.created_at)
        assert in_order[0].attempt == 2
        assert all(r.attempt in (1, 2) for r in in_order[1:])
        assert all(n == 1 for n in completions(chat).values())


@pytest.mark.parametrize("own_redis", ["empty"], indirect=True)
def test_a_worker_killed_mid_answer_is_replaced_without_waiting_for_visibility(
    own_redis, api, user, worker_process, fake_openai, tmp_path, settings
):
    """The whole worker (pool processes too) is SIGKILLed while it streams an answer and
    holds a second run it received but has not started. The first's lease runs out, the
    second's mark names a worker that is gone: the recovery pass dispatches both again,
    another worker answers them, and tells the client the first answer starts over."""
    settings.RUN_LEASE_SECONDS = LEASE_SECONDS
    fake_openai.mode, fake_openai.delay = "slow", 0.3
    fake_openai.tokens = [f"w{i} " for i in range(20)]
    project = ProjectFactory(owner=user)
    agent = AgentFactory(project=project, model="gpt-local")
    session, waiting = (ChatSessionFactory(agent=agent, project=project) for _ in range(2))
    env = {
        "OPENAI_BASE_URL": fake_openai.base_url,
        "OPENAI_API_KEY": "test-key",
        "RUN_LEASE_SECONDS": str(LEASE_SECONDS),
        "QDRANT_PATH": str(tmp_path / "qdrant"),
    }
    # One process, two tasks prefetched: the second waits, received, behind the first.
    first = worker_process("-P", "prefork", "-c", "1", "--prefetch-multiplier", "2", env=env)
    first.wait_started()
    answer_id = post(api, session, "Tell me something long")
    held_id = post(api, waiting, "And you?")
    run, held = Run.objects.get(message_id=answer_id), Run.objects.get(message_id=held_id)
    wait_until(
        lambda: (
            Message.objects.get(id=answer_id).status == "streaming"
            and any(
                k == "message.delta" for _, k, _ in stream_events(_redis(), project, session.id)
            )
        ),
        what="the answer streaming",
    )

    def held_by_a_worker() -> bool:
        marks = streams.runs_marks(redis=scoped(user.pk, project.id), run_ids=[str(held.id)])
        return bool(marks[str(held.id)])

    wait_until(held_by_a_worker, what="the second run received")
    first.kill_group()
    started = time.monotonic()

    second = worker_process("-P", "prefork", "-c", "1", env=env)
    second.wait_started()
    fake_openai.delay = 0.01
    recover_until_finished([answer_id, held_id], timeout=30)
    assert time.monotonic() - started < 30  # not the broker's visibility timeout (1 h)

    run.refresh_from_db()
    answer = Message.objects.get(id=answer_id)
    assert run.status == "done" and run.starts == 2 and run.attempt == 2
    assert answer.status == "done" and answer.content == "".join(fake_openai.tokens)
    kinds = [k for _, k, d in stream_events(_redis(), project, session.id)]
    assert kinds.count("message.restarted") == 1 and kinds.count("message.completed") == 1
    assert kinds.index("message.restarted") < kinds.index("message.completed")
    held.refresh_from_db()
    assert held.status == "done" and held.starts == 1 and held.attempt == 2
    held_kinds = [k for _, k, d in stream_events(_redis(), project, waiting.id)]
    assert held_kinds.count("message.completed") == 1 and "message.restarted" not in held_kinds


def test_an_event_stream_open_across_a_redis_restart_goes_on_with_what_follows(
    own_redis, asgi, api, user, chat, worker
):
    """A client follows the session while Redis is killed and started again (empty, or
    from its append-only file): the same connection, never closed, gets the next
    answer's events, each once."""
    worker()
    first = post(api, chat, "before")
    wait_until(lambda: finished([first]), what="the first answer")
    result: dict = {}

    def follow():
        result["read"] = read_sse(
            events_url(asgi, chat),
            headers={"Authorization": f"Token {token_for(user)}"},
            until=lambda events: "second" in result and completed(result["second"])(events),
            max_seconds=90,
        )

    reader = threading.Thread(target=follow)
    reader.start()
    wait_until(lambda: sse.active_streams() == 1, what="the client following")
    own_redis.kill()
    own_redis.start()
    result["second"] = second = post(api, chat, "after")
    recover_until_finished([second])
    reader.join(60)
    assert not reader.is_alive()
    status, events, _ = result["read"]
    assert status == 200
    ids = [e["id"] for e in events]
    assert len(ids) == len(set(ids))  # each once
    mine = [e for e in events if second in (e["data"].get("id"), e["data"].get("message_id"))]
    kinds = [e["event"] for e in mine]
    assert kinds[0] == "message.created" and kinds[-1] == "message.completed", kinds
    content = "".join(e["data"]["delta"] for e in mine if e["event"] == "message.delta")
    assert content == Message.objects.get(id=second).content


def test_an_answer_cut_off_by_redis_is_answered_once_it_is_back(
    own_redis, api, user, worker_process, fake_openai, tmp_path, settings
):
    """Redis dies while a worker streams an answer and holds a second run it received
    but has not started. The first is not the agent's failure: it goes back to the queue.
    The second was dropped by the worker when it reconnected to the broker. Both are
    answered in full, once each, after Redis is back."""
    settings.RUN_REDISPATCH_SECONDS = 0
    fake_openai.mode, fake_openai.delay = "slow", 0.2
    fake_openai.tokens = [f"w{i} " for i in range(30)]
    project = ProjectFactory(owner=user)
    agent = AgentFactory(project=project, model="gpt-local")
    session, waiting = (ChatSessionFactory(agent=agent, project=project) for _ in range(2))
    env = {
        "OPENAI_BASE_URL": fake_openai.base_url,
        "OPENAI_API_KEY": "test-key",
        "QDRANT_PATH": str(tmp_path / "qdrant"),
    }
    worker = worker_process("-P", "prefork", "-c", "1", "--prefetch-multiplier", "2", env=env)
    worker.wait_started()
    answer_id = post(api, session, "Tell me something long")
    held_id = post(api, waiting, "And you?")
    held = Run.objects.get(message_id=held_id)

    def held_by_the_worker() -> bool:
        marks = streams.runs_marks(redis=scoped(user.pk, project.id), run_ids=[str(held.id)])
        return bool(marks[str(held.id)])

    wait_until(lambda: Message.objects.get(id=answer_id).status == "streaming", what="the answer")
    wait_until(held_by_the_worker, what="the second run received")
    wait_until(
        lambda: any(
            k == "message.delta" and d.get("message_id") == answer_id
            for _, k, d in stream_events(_redis(), project, session.id)
        ),
        what="deltas out",
    )
    aof_synced(own_redis)  # the file has the marks
    own_redis.kill()
    wait_until(
        lambda: Run.objects.get(message_id=answer_id).status == "queued",
        timeout=30,
        what="the run given back",
    )
    own_redis.start()
    fake_openai.delay = 0.01
    recover_until_finished([answer_id, held_id], timeout=60)

    run = Run.objects.get(message_id=answer_id)
    answer = Message.objects.get(id=answer_id)
    # Attempts: the first dispatch, taken back, the recovery's dispatch.
    assert run.status == "done" and run.starts == 2 and run.attempt == 3
    assert answer.status == "done" and answer.content == "".join(fake_openai.tokens)
    assert completions(session) == {answer_id: 1}
    kinds = [k for _, k, _ in stream_events(_redis(), project, session.id)]
    assert "message.error" not in kinds and "message.restarted" in kinds
    held.refresh_from_db()
    assert held.status == "done" and held.starts == 1
    assert Message.objects.get(id=held_id).content == "".join(fake_openai.tokens)
    assert completions(waiting) == {held_id: 1}


def test_a_run_that_keeps_losing_its_worker_ends_in_error(transactional_db, api, chat, settings):
    answer_id = post(api, chat)
    run = Run.objects.get(message_id=answer_id)
    for _ in range(settings.RUN_MAX_STARTS):
        Run.objects.filter(id=run.id).update(
            status="running", starts=run.starts + 1, lease_expires_at=timezone.now() - timedelta(1)
        )
        run.refresh_from_db()
        assert runs_recover()["restarted"] == 1
        run.refresh_from_db()
    with pytest.raises(AgentRunFailed):
        chat_run(run_id=run.id, attempt=run.attempt)
    answer = Message.objects.get(id=answer_id)
    assert answer.status == "error" and "interrupted" in answer.error
    kinds = [k for _, k, _ in stream_events(_redis(), chat.project, chat.id)]
    assert kinds[-1] == "message.error"


def test_a_run_that_loses_its_database_connection_before_it_starts_waits_and_answers(
    transactional_db, api, chat, caplog
):
    """The worker's connection to the database is cut just as a run would start (the
    server ended it, as a failover or a restart does): the start is tried again on a
    new connection, and the run is answered, not failed while its mark still names this
    worker (chat.dispatch: the recovery pass leaves a live worker's runs to it)."""
    if connection.vendor != "postgresql":
        pytest.skip("ends a PostgreSQL session")
    answer_id = post(api, chat)
    run = Run.objects.get(message_id=answer_id)
    outcome: list = []

    def worker_thread() -> None:
        try:
            connection.ensure_connection()
            with psycopg.connect(database_url(), autocommit=True) as other:
                other.execute(
                    "SELECT pg_terminate_backend(%s)", [connection.connection.info.backend_pid]
                )
            outcome.append(chat_run(run_id=run.id, attempt=run.attempt))
        except Exception as exc:
            outcome.append(exc)
        finally:
            connection.close()

    with caplog.at_level(logging.WARNING, logger="common.lifecycle"):
        thread = threading.Thread(target=worker_thread, daemon=True)
        thread.start()
        thread.join(30)
    assert outcome == ["done"]
    assert "trying again" in caplog.text  # the cut was met, not missed
    assert Message.objects.get(id=answer_id).status == "done"


def test_cancel_stops_provider_retries(live_worker, api, user, fake_openai, runtime_settings):
    runtime_settings.LLM_MAX_RETRIES = 20
    fake_openai.mode = "error"  # HTTP 500: retried with backoff
    project = ProjectFactory(owner=user)
    session = ChatSessionFactory(
        agent=AgentFactory(project=project, model="gpt-local"), project=project
    )
    answer_id = post(api, session)
    wait_until(lambda: len(fake_openai.requests) >= 2, what="a retry")

    response = api.post(f"/my/projects/{project.id}/chat/{session.id}/cancel/")

    assert response.status_code == 202 and response.json() == {"cancelled": [answer_id]}
    wait_until(
        lambda: (
            Run.objects.get(message_id=answer_id).lease_expires_at is None
            and not _held_here(answer_id)
        ),
        what="the run let go",
    )
    calls = len(fake_openai.requests)
    # The run's task has returned (Celery never retries it): no try of it can come now.
    wait_until(
        lambda: not worker_state.active_requests and not worker_state.reserved_requests,
        what="the worker idle",
    )
    assert len(fake_openai.requests) == calls  # no call after the cancel was seen
    assert Message.objects.get(id=answer_id).status == "cancelled"


def _held_here(message_id) -> bool:
    run = Run.objects.get(message_id=message_id)
    return any(h.run_id == run.id for h in lease_keeper().held())


def test_a_cancel_racing_the_answer_reports_what_happened(live_worker, api, chat):
    url = f"/my/projects/{chat.project_id}/chat/{chat.id}/cancel/"
    for _ in range(8):
        answer_id = post(api, chat)
        cancelled = api.post(url).json()["cancelled"]
        kind, _ = wait_for_event(
            _redis(),
            chat.project,
            chat.id,
            types={"message.completed", "message.cancelled", "message.error"},
            message_id=answer_id,
        )
        status = Message.objects.get(id=answer_id).status
        if answer_id in cancelled:
            assert status == "cancelled" and kind == "message.cancelled"
        else:
            assert status == "done" and kind == "message.completed"
    terminal = [
        (d["message_id"], k)
        for _, k, d in stream_events(_redis(), chat.project, chat.id)
        if k in ("message.completed", "message.cancelled", "message.error")
    ]
    assert len(terminal) == len({m for m, _ in terminal})  # one end per message


def test_a_failed_run_is_a_failed_task_and_a_problem_in_health(
    live_worker, api, user, fake_openai, admin_client
):
    """One tenant's failed run is that project's problem: the deployment's health stays
    200 (a load balancer on it keeps every tenant online), names the project, and the
    project's own health route answers 503 while another project's answers 200."""
    failed = []

    def on_failure(sender=None, **kwargs):
        failed.append(sender.name)

    task_failure.connect(on_failure, weak=False)
    try:
        fake_openai.mode = "error"
        project = ProjectFactory(owner=user, name="the failing one")
        session = ChatSessionFactory(
            agent=AgentFactory(project=project, model="gpt-local"), project=project
        )
        answer_id = post(api, session)
        wait_until(lambda: "agents.run_agent" in failed, what="the task failing")
    finally:
        task_failure.disconnect(on_failure)
    assert Message.objects.get(id=answer_id).status == "error"
    other = ProjectFactory(owner=user)
    AgentFactory(project=other)

    response = admin_client.get("/admin/workspaces/health")
    health = response.json()
    assert response.status_code == 200, health
    assert health["healthy"] is True and "runs" in health["degraded"]
    assert health["checks"]["runs"]["failed_recently"] >= 1
    assert health["checks"]["runs"]["healthy"] is False
    named = {p["project_id"]: p for p in health["unhealthy_projects"]}
    assert str(project.id) in named and str(other.id) not in named
    assert named[str(project.id)]["project_name"] == "the failing one"
    assert "failed" in named[str(project.id)]["problems"][0]

    mine = admin_client.get(f"/admin/workspaces/health/projects/{project.id}")
    assert mine.status_code == 503, mine.json()
    assert mine.json()["checks"]["runs"]["failed_recently"] == 1
    assert mine.json()["problems"][0].startswith("runs: 1 run(s) failed")
    theirs = admin_client.get(f"/admin/workspaces/health/projects/{other.id}/")
    assert theirs.status_code == 200 and theirs.json()["healthy"] is True, theirs.json()
    gone = admin_client.get(f"/admin/workspaces/health/projects/{uuid.uuid4()}")
    assert gone.status_code == 404
    stats = admin_client.get("/admin/workspaces/stats").json()
    assert stats["runs"]["failed_recently"] >= 1


def test_deleting_a_project_stops_its_ingest_and_tears_down_in_seconds(live_worker, api, user):
    project = ProjectFactory(owner=user)
    agent = AgentFactory(project=project)
    url = f"/my/projects/{project.id}/agents/{agent.id}/context/"
    words = "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod".split()
    documents = [" ".join(words[(i + j) % len(words)] for j in range(80)) for i in range(100)]
    for _ in range(2):
        assert api.post(url, {"documents": documents}, format="json").status_code == 202
    store = get_vector_store()

    def stored() -> int:
        return store.count(TenantScope.project(user_id=user.pk, project_id=project.id))

    wait_until(lambda: stored() > 0, what="the ingest under way")
    assert api.delete(f"/my/projects/{project.id}/").status_code == 204
    deleted = time.monotonic()
    wait_until(
        lambda: WorkspaceTeardown.objects.filter(project_id=project.id, status="done").exists(),
        timeout=5,
        what="the teardown done within 5 s",
    )
    done_after = time.monotonic() - deleted
    # Whatever still ran has stopped (a batch of a deleted project publishes no next
    # one): nothing can come back after this.
    wait_until(
        lambda: not worker_state.active_requests and not worker_state.reserved_requests,
        what="the worker idle",
    )
    assert stored() == 0
    assert done_after < 5
    # Its jobs left the recovery pass's index with it.
    prefix = workspace_prefix(user.pk, project.id)
    assert not [m for m in job_records.index_members() if m.startswith(prefix)]


@pytest.mark.parametrize("own_redis", ["empty"], indirect=True)
@pytest.mark.parametrize("repeatable", [False, True])
def test_a_worker_killed_mid_tool_call_repeats_only_a_repeatable_call(
    own_redis, api, user, worker_process, fake_openai, tmp_path, settings, repeatable
):
    """The worker is SIGKILLed while a tool call is in flight. Started over, a run
    whose call may be repeated makes it again and answers; one whose call may not ends
    in error saying which call may have taken effect, and does not make it again."""
    settings.RUN_LEASE_SECONDS = LEASE_SECONDS
    tools = ToolServer().start()
    tools.slow_seconds = 30
    try:
        project = ProjectFactory(owner=user)
        agent = AgentFactory(project=project, model="gpt-local")
        Tool.objects.create(
            agent=agent,
            kind="http",
            name="book",
            method="POST",
            url_template=tools.url + "/slow",
            safe_to_repeat=repeatable,
        )
        session = ChatSessionFactory(agent=agent, project=project)
        fake_openai.turns = [{"tool_calls": [("book", {})]} for _ in range(2)]
        env = {
            "OPENAI_BASE_URL": fake_openai.base_url,
            "OPENAI_API_KEY": "test-key",
            "RUN_LEASE_SECONDS": str(LEASE_SECONDS),
            "EGRESS_ALLOW_NETWORKS_TOOLS": "127.0.0.0/8",
            "QDRANT_PATH": str(tmp_path / "qdrant"),
        }
        first = worker_process("-P", "prefork", "-c", "1", env=env)
        first.wait_started()
        answer_id = post(api, session, "Book it.")
        wait_until(lambda: len(tools.requests) == 1, what="the tool call in flight")
        first.kill_group()

        tools.slow_seconds = 0.01
        second = worker_process("-P", "prefork", "-c", "1", env=env)
        second.wait_started()
        recover_until_finished([answer_id], timeout=30)
    finally:
        tools.stop()

    run = Run.objects.get(message_id=answer_id)
    assert run.starts == 2
    if repeatable:
        assert run.status == "done", run.error
        assert len(tools.requests) == 2
    else:
        assert run.status == "error" and "book" in run.error
        assert "may have taken effect" in run.error
        assert len(tools.requests) == 1  # not made again
