"""A context search under ASGI waits for its worker without holding a thread or a
database connection, and a flood of them from one user is turned away with 429 before
it can hurt anyone else."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from django.conf import settings
from django.db import connection
from django.utils.module_loading import import_string

from config.settings import base
from context import waits
from realtime import auth, replies, streamhub
from tests.factories import AgentFactory, ChatSessionFactory, ProjectFactory, UserFactory
from tests.runtime.conftest import queued_task_names, threads_inside, token_for
from tests.workers import shared_pool_worker, wait_until

pytestmark = pytest.mark.slow


def search_url(server, agent) -> str:
    return (
        f"http://127.0.0.1:{server.port}/my/projects/{agent.project_id}/agents/{agent.id}/context/"
    )


def search_as(server, agent, token: str, *, timeout: float) -> httpx.Response:
    """One context search of `agent` with that user's token."""
    return httpx.get(
        search_url(server, agent),
        params={"q": "x"},
        headers={"Authorization": f"Token {token}"},
        timeout=timeout,
    )


def database_sessions() -> int:
    if connection.vendor != "postgresql":
        return 0
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()")
        return cursor.fetchone()[0]


def test_a_search_under_asgi_is_answered_by_the_worker(asgi, live_worker, user):
    agent = AgentFactory(project=ProjectFactory(owner=user))
    response = httpx.get(
        search_url(asgi, agent),
        params={"q": "anything", "k": 3},
        headers={"Authorization": f"Token {token_for(user)}"},
        timeout=20,
    )
    assert response.status_code == 200, response.text
    assert response.json() == {"results": []}  # nothing stored yet


def test_waiting_searches_hold_no_thread_nor_database_connection(
    asgi, user, settings, redis_client
):
    """No worker runs: every search waits for its whole timeout (long enough for all 30
    to be in flight at once on a loaded machine)."""
    settings.SEARCH_INFLIGHT_PER_USER = settings.SEARCH_INFLIGHT_PER_PROJECT = 100
    agent = AgentFactory(project=ProjectFactory(owner=user))
    headers = {"Authorization": f"Token {token_for(user)}"}
    # Warm up: the hub, the database pool and the server's threads exist before counting
    # (a short wait: the server runs in this process, on these settings).
    settings.CONTEXT_SEARCH_TIMEOUT_SECONDS = 0.5
    httpx.get(search_url(asgi, agent), params={"q": "x"}, headers=headers, timeout=10)
    settings.CONTEXT_SEARCH_TIMEOUT_SECONDS = 8
    sessions = database_sessions()
    in_flight = f"uws:user:{user.pk}:inflight:search"

    answers = []
    clients = [
        threading.Thread(
            target=lambda: answers.append(
                httpx.get(search_url(asgi, agent), params={"q": "x"}, headers=headers, timeout=30)
            )
        )
        for _ in range(30)
    ]
    for client in clients:
        client.start()
    wait_until(lambda: redis_client.get(in_flight) == "30", what="all 30 searches waiting")
    # No thread is inside the search's code while the 30 wait (each is a coroutine; the
    # sync steps before the wait share a small fixed pool of threads, and are over).
    assert threads_inside(waits, replies, streamhub, auth) == []
    assert database_sessions() <= sessions + 2
    for client in clients:
        client.join(30)
    assert [a.status_code for a in answers] == [503] * 30  # nobody answered in time


def test_a_flood_of_searches_is_turned_away_and_others_are_served(asgi, user, settings):
    """The flood arrives before any worker answers, so its searches are all in flight at
    once: the first SEARCH_INFLIGHT_PER_USER wait, the rest are turned away at once.
    Another user's searches are then served by the worker as usual."""
    settings.SEARCH_INFLIGHT_PER_USER = settings.SEARCH_INFLIGHT_PER_PROJECT = 4
    settings.CONTEXT_SEARCH_TIMEOUT_SECONDS = 15
    flooder = AgentFactory(project=ProjectFactory(owner=user))
    other_user = UserFactory()
    other = AgentFactory(project=ProjectFactory(owner=other_user))
    codes: list[tuple] = []
    tokens = {u.pk: token_for(u) for u in (user, other_user)}  # here: client threads use no DB

    def search(agent, who):
        response = search_as(asgi, agent, tokens[who.pk], timeout=30)
        codes.append((who.pk, response.status_code, response.headers.get("Retry-After")))

    flood = [threading.Thread(target=search, args=(flooder, user)) for _ in range(40)]
    for t in flood:
        t.start()
    wait_until(lambda: len(codes) == 36, timeout=15, what="the flood's refusals")
    assert {(code, bool(retry)) for _, code, retry in codes} == {(429, True)}

    with shared_pool_worker():
        others = [threading.Thread(target=search, args=(other, other_user)) for _ in range(4)]
        for t in others:
            t.start()
        for t in flood + others:
            t.join(30)
    mine = [code for who, code, _ in codes if who == user.pk]
    theirs = [code for who, code, _ in codes if who == other_user.pk]
    assert sorted(mine) == [200] * 4 + [429] * 36  # the four waiting were answered
    assert theirs == [200] * 4


def test_every_middleware_can_run_async():
    """One sync-only middleware makes Django run the chain below it inside one blocking
    call on asgiref's single shared thread: every waiting request would queue there."""
    for path in {*base.MIDDLEWARE, *settings.MIDDLEWARE}:
        assert getattr(import_string(path), "async_capable", False), path


def test_another_users_search_and_stream_do_not_wait_behind_a_flood(asgi, user, settings):
    """No worker answers: user A's searches all wait out their timeout. User B's search
    fails at the same bound, counted from its own start, not after A's; B's event stream
    opens at once meanwhile (the chain is async from the ASGI entry to the response)."""

    # Long enough that "behind even one of A's waits" (> 5.5 s) and "a busy machine"
    # (B's stream took 1.8 s at load 15) stay apart around the bound of timeout / 2.
    timeout = settings.CONTEXT_SEARCH_TIMEOUT_SECONDS = 6
    settings.SEARCH_INFLIGHT_PER_USER = settings.SEARCH_INFLIGHT_PER_PROJECT = 40
    settings.WEB_WAITING_PER_CREDENTIAL = 40  # all of A's wait: none refused at the door
    flooder = AgentFactory(project=ProjectFactory(owner=user))
    other_user = UserFactory()
    other = AgentFactory(project=ProjectFactory(owner=other_user))
    session = ChatSessionFactory(project=other.project, agent=other)
    tokens = {u.pk: token_for(u) for u in (user, other_user)}
    answered: list[tuple[int, float]] = []

    def search(agent, who, into):
        started = time.monotonic()
        response = search_as(asgi, agent, tokens[who.pk], timeout=30)
        into.append((response.status_code, time.monotonic() - started))

    flood = [threading.Thread(target=search, args=(flooder, user, answered)) for _ in range(40)]
    for thread in flood:
        thread.start()
    # The flood is in: every one of A's searches sent its task (nobody takes it) and waits.
    wait_until(
        lambda: queued_task_names(flooder.project_id).count("agents.search_context") == 40,
        what="all 40 of A's searches waiting",
    )

    events = (
        f"http://127.0.0.1:{asgi.port}/my/projects/{other.project_id}/chat/{session.id}/events/"
    )
    started = time.monotonic()
    with httpx.stream(
        "GET", events, headers={"Authorization": f"Token {tokens[other_user.pk]}"}, timeout=10
    ) as response:
        assert response.status_code == 200
        opened = time.monotonic() - started
    mine: list[tuple[int, float]] = []
    search(other, other_user, mine)
    for thread in flood:
        thread.join(30)

    # Not behind A's waits (3 s each); the bound leaves room for a busy machine.
    assert opened < timeout / 2, opened
    [(code, took)] = mine
    assert code == 503
    # Its own timeout, not after A's (past timeout + 5.5 s); room for a busy machine.
    assert timeout - 0.5 < took < timeout + 3, took
    assert [c for c, _ in answered] == [503] * 40


def test_a_users_flood_waits_on_its_own_lane_and_past_its_bound_is_refused(
    asgi, live_worker, user, settings, monkeypatch
):
    """User A's searches are held in their sync step (authentication and reads) while
    more of them arrive than there are lanes: with every waiting request's steps on one
    shared pool, B would queue behind them. B's search (answered by the worker) and B's
    event stream open while A's are still held; A's requests past
    WEB_WAITING_PER_CREDENTIAL are refused with 429 and Retry-After before any step ran."""
    settings.WEB_WAITING_SYNC_THREADS = 2
    settings.WEB_WAITING_PER_CREDENTIAL = 6
    settings.SEARCH_INFLIGHT_PER_USER = settings.SEARCH_INFLIGHT_PER_PROJECT = 40
    flooder = AgentFactory(project=ProjectFactory(owner=user))
    other_user = UserFactory()
    other = AgentFactory(project=ProjectFactory(owner=other_user))
    session = ChatSessionFactory(project=other.project, agent=other)
    tokens = {u.pk: token_for(u) for u in (user, other_user)}

    held, release, prepared = threading.Event(), threading.Event(), []
    prepare = waits._prepare

    def held_for_a(request, project_id, agent_id):
        prepared.append(project_id)
        if project_id == flooder.project_id:
            held.set()
            assert release.wait(30), "never released"
        return prepare(request, project_id, agent_id)

    monkeypatch.setattr(waits, "_prepare", held_for_a)
    answers: list[tuple[int, int, str | None]] = []

    def search(agent, who):
        response = search_as(asgi, agent, tokens[who.pk], timeout=40)
        answers.append((who.pk, response.status_code, response.headers.get("Retry-After")))

    flood = [threading.Thread(target=search, args=(flooder, user)) for _ in range(10)]
    for thread in flood:
        thread.start()
    try:
        assert held.wait(10)
        wait_until(lambda: len(answers) == 4, timeout=15, what="the refusals past the bound")
        assert answers == [(user.pk, 429, "2")] * 4  # WEB_ADMISSION_RETRY_AFTER_SECONDS
        assert prepared == [flooder.project_id]  # A's others queue on A's one lane

        events = (
            f"http://127.0.0.1:{asgi.port}/my/projects/{other.project_id}/chat/{session.id}/events/"
        )
        headers = {"Authorization": f"Token {tokens[other_user.pk]}"}
        with httpx.stream("GET", events, headers=headers, timeout=20) as response:
            assert response.status_code == 200
        search(other, other_user)
        assert answers[-1][:2] == (other_user.pk, 200)
        assert not release.is_set() and len(answers) == 5  # A's six are still held
    finally:
        release.set()
        for thread in flood:
            thread.join(40)
    mine = sorted(code for who, code, _ in answers if who == user.pk)
    assert mine == [200] * 6 + [429] * 4
