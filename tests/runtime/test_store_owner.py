"""The embedded vector store with several worker processes (context.store_owner): one
owns the folder, the others send their store calls to it; a killed owner's store is
taken over within its lease. Real worker processes (the Procfile's thread pool), real
Redis, real Qdrant local mode (Edge) in one folder."""

from __future__ import annotations

import os
import time
import uuid

import pytest

from agentbus import MAINTENANCE_QUEUE
from chat.models import Message, Run
from context import store_owner
from context.qdrant_store import VectorStore
from context.store_owner import LEASE_KEY, RemoteStore, StoreUnavailable, answer
from context.vectorstore import (
    ContextPoint,
    TenantScope,
    TenantScopeRequired,
    close_vector_store,
    get_vector_store,
)
from tests.factories import AgentFactory, ChatSessionFactory
from tests.runtime.test_chat import add_context, post_message
from tests.workers import wait_until

pytestmark = [pytest.mark.slow]

LEASE_SECONDS = 4
POOL = ("-Q", MAINTENANCE_QUEUE, "--pool=threads", "--concurrency=4")


@pytest.fixture
def two_workers(transactional_db, worker_process, tmp_path, settings):
    """Two worker processes on one embedded folder, as two `worker` lines would run."""
    rates = settings.REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"]
    rates = {**rates, "messages_user": "10000/min", "messages_project": "10000/min"}
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "DEFAULT_THROTTLE_RATES": rates}
    env = {
        "QDRANT_PATH": str(tmp_path / "qdrant"),
        "VECTOR_STORE_LEASE_SECONDS": str(LEASE_SECONDS),
    }
    close_vector_store()  # this process's own store (another folder) serves nobody here
    workers = [worker_process(*POOL, env=env) for _ in range(2)]
    for worker in workers:
        worker.wait_ready()
    return workers


def owner_pid(redis_client) -> int | None:
    holder = redis_client.get(LEASE_KEY)
    return int(holder.split(":")[1]) if holder else None


def post_all(api, sessions, rounds: int) -> list[int]:
    return [
        post_message(api, s, f"What is the office cat called? ({i}.{n})")["assistant_message_id"]
        for n in range(rounds)
        for i, s in enumerate(sessions)
    ]


def ended(ids) -> bool:
    return Message.objects.filter(id__in=ids, status__in=Message.FINISHED).count() == len(ids)


def test_two_worker_processes_share_the_embedded_store(two_workers, api, project, redis_client):
    """40 answers with context over two processes: each searches the context and stores
    its exchange, and none fails (before, the process that could not open the folder
    failed every answer it took: `the agent run failed: RuntimeError`)."""
    agent = AgentFactory(project=project)
    add_context(api, agent, ["The office cat is called Barsik and sleeps on the rack."])
    sessions = [ChatSessionFactory(agent=agent, project=project) for _ in range(10)]
    answers = post_all(api, sessions, rounds=4)
    wait_until(lambda: ended(answers), timeout=240, interval=0.5, what="40 answers")

    failed = list(
        Message.objects.filter(id__in=answers)
        .exclude(status="done")
        .values_list("error", flat=True)
    )
    assert not failed, f"{len(failed)} of 40 failed: {failed[:3]}"
    contents = Message.objects.filter(id__in=answers).values_list("content", flat=True)
    # Each run searched the context and found some (the cat, or earlier exchanges).
    assert all("The most relevant context I hold:" in c for c in contents)
    # Both processes answered, and one of them owns the store.
    pids = {w.rpartition(":")[2] for w in Run.objects.filter(message_id__in=answers).values_list(
        "worker", flat=True)}  # fmt: skip
    assert pids == {str(w.pid) for w in two_workers}, pids
    assert owner_pid(redis_client) in {w.pid for w in two_workers}
    # Every exchange was remembered, whichever process answered.
    scope = TenantScope.agent(user_id=project.owner_id, project_id=project.id, agent_id=agent.id)
    # (stored after each answer ended: waited for, not read at once)
    wait_until(
        lambda: RemoteStore(close_vector_store).count(scope) == 1 + 40,
        timeout=60,
        what="every exchange stored",
    )


def test_a_killed_owner_is_taken_over_within_its_lease(two_workers, api, project, redis_client):
    agent = AgentFactory(project=project)
    add_context(api, agent, ["The office cat is called Barsik and sleeps on the rack."])
    sessions = [ChatSessionFactory(agent=agent, project=project) for _ in range(4)]
    first = post_all(api, sessions, rounds=1)
    wait_until(lambda: ended(first), timeout=60, what="the first answers")
    scope = TenantScope.agent(user_id=project.owner_id, project_id=project.id, agent_id=agent.id)
    # A run stores its exchange after its answer has ended: one the owner was writing
    # for its own run when killed would go with it.
    wait_until(
        lambda: RemoteStore(close_vector_store).count(scope) == 1 + 4,
        timeout=60,
        what="the first exchanges stored",
    )
    owner = next(w for w in two_workers if w.pid == owner_pid(redis_client))
    other = next(w for w in two_workers if w is not owner)

    owner.kill_group()
    killed = time.monotonic()
    answers = post_all(api, sessions, rounds=2)
    wait_until(
        lambda: owner_pid(redis_client) == other.pid, timeout=30, what="the store taken over"
    )
    took_over = time.monotonic() - killed
    wait_until(lambda: ended(answers), timeout=90, interval=0.5, what="answers after the kill")

    messages = Message.objects.filter(id__in=answers)
    assert set(messages.values_list("status", flat=True)) == {"done"}
    # The context stored before the kill is there: the survivor opened the same folder.
    assert all("The most relevant context I hold:" in m.content for m in messages)
    wait_until(
        lambda: RemoteStore(close_vector_store).count(scope) == 1 + 4 + 8,
        timeout=60,
        what="every exchange stored",
    )
    print(f"takeover {took_over:.2f}s after the kill (lease {LEASE_SECONDS}s)")
    assert took_over <= LEASE_SECONDS + 5  # the lease, then the next call's slice


# --- the wire, in this process: it owns the store and answers its own RemoteStore ----


def scope_of(agent) -> TenantScope:
    return TenantScope.agent(
        user_id=agent.project.owner_id, project_id=agent.project_id, agent_id=agent.id
    )


def points(n: int, dim: int = 8) -> list[ContextPoint]:
    return [
        ContextPoint(
            str(uuid.uuid4()),
            [float(i == j) for j in range(dim)],
            {"text": f"point {i}", "meta": {"~set": [1]}},
        )
        for i in range(n)
    ]


def test_a_forwarded_call_is_the_owners_own(transactional_db, project, redis_client):
    local = get_vector_store()
    assert redis_client.get(LEASE_KEY).split(":")[1] == str(os.getpid())
    remote = RemoteStore(close_vector_store)
    mine, theirs = AgentFactory(project=project), AgentFactory(project=project)
    stored = points(5)
    assert remote.upsert(scope_of(mine), stored, model="m", dim=8) == 5
    assert remote.count(scope_of(mine)) == local.count(scope_of(mine)) == 5
    assert remote.count(scope_of(theirs)) == 0
    query = stored[2].vector
    near = remote.search(scope_of(mine), query, k=2, model="m", dim=8)
    assert near == local.search(scope_of(mine), query, k=2, model="m", dim=8)
    assert near[0].id == stored[2].id and near[0].payload["meta"] == {"~set": [1]}
    page, _ = remote.scroll(scope_of(mine), collection=local.shared_collections()[0])
    assert {p.id for p in page} == {p.id for p in stored}
    assert scope_of(mine) in set().union(*remote.contexts().values())
    remote.delete(scope_of(mine))
    assert local.count(scope_of(mine)) == 0


def test_the_owner_serves_only_the_stores_calls_with_a_scope(transactional_db, project):
    store = get_vector_store()
    agent = AgentFactory(project=project)
    wire = store_owner.encode([scope_of(agent)])
    for op in ("close", "_shared", "sparse_reindex", "__class__"):
        assert answer(store, {"op": op, "args": wire, "kwargs": {}})["error"] == "ValueError"
    # A scope is made again by TenantScope's constructors: bad ids are refused.
    forged = {"~scope": [project.owner_id, "not-a-uuid", None]}
    assert "error" in answer(store, {"op": "count", "args": [forged], "kwargs": {}})
    # No scope, no point operation.
    refused = answer(store, {"op": "count", "args": [{"user_id": 1}], "kwargs": {}})
    assert refused["error"] == "TenantScopeRequired"
    with pytest.raises(TenantScopeRequired):
        RemoteStore(close_vector_store).count({"user_id": 1})


def test_a_call_nobody_answers_ends_in_a_clear_error(transactional_db, redis_client, settings):
    close_vector_store()
    # An owner that holds the lease and answers nothing (a process stuck, or one whose
    # folder this process cannot reach).
    redis_client.set(LEASE_KEY, "elsewhere:1:stuck", px=60_000)
    settings.VECTOR_STORE_FORWARD_TIMEOUT_SECONDS = 1.5
    started = time.monotonic()
    try:
        with pytest.raises(StoreUnavailable, match="no process answered .*elsewhere:1:stuck"):
            RemoteStore(close_vector_store).count(
                TenantScope.project(user_id=1, project_id=uuid.uuid4())
            )
        assert time.monotonic() - started < 5
    finally:
        redis_client.delete(LEASE_KEY, store_owner.REQUESTS_KEY)


def test_an_owner_cut_off_past_its_lease_hands_the_store_over(
    transactional_db, redis_client, settings
):
    """Another process took the lease while this one could not renew it (a partitioned
    host): this process closes its own store and sends its calls to the new owner,
    instead of both writing stores of their own."""
    close_vector_store()
    settings.VECTOR_STORE_LEASE_SECONDS = 1.5
    assert isinstance(get_vector_store(), VectorStore)
    redis_client.set(LEASE_KEY, "elsewhere:1:taker", px=60_000)
    try:
        wait_until(lambda: get_vector_store.peek() is None, timeout=10, what="the hand-over")
        assert isinstance(get_vector_store(), RemoteStore)
    finally:
        redis_client.delete(LEASE_KEY)
        close_vector_store()
