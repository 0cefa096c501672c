"""The SSE endpoint under a real ASGI server (uvicorn in a thread of the test process, so the
test can look at the server's event loop and the generators it runs)."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest
from django.conf import settings
from django.db import connection
from django.http import Http404
from django.test import Client, RequestFactory
from django.test.utils import CaptureQueriesContext

from chat import events as sse
from chat import streams
from chat.models import Message
from chat.streams import stream_key
from common.asgi import serves_long_lived
from realtime import auth, streamhub
from tests.factories import AgentFactory, ChatSessionFactory, ProjectFactory
from tests.local_http import free_port
from tests.runtime.conftest import (
    stream_events,
    threads_inside,
    token_for,
    wait_for_event,
)
from tests.workers import wait_until
from workspaces.redis import scoped, workspace_prefix

pytestmark = pytest.mark.slow


def events_url(server, session, project=None):
    project_id = project.id if project else session.project_id
    return f"http://127.0.0.1:{server.port}/my/projects/{project_id}/chat/{session.id}/events/"


def read_sse(url, *, headers=None, params=None, until=None, max_seconds=20, opened=False):
    """Read an SSE response; returns (status, events, comments). Stops when `until(events)`
    is true, at its first comment if `opened` (the stream says it is connected), when the
    server ends the stream, or after max_seconds."""
    events, comments, current = [], [], {}
    deadline = time.monotonic() + max_seconds
    with httpx.stream(
        "GET", url, headers=headers or {}, params=params, timeout=httpx.Timeout(max_seconds)
    ) as response:
        if response.status_code != 200:
            response.read()
            return response.status_code, response.json(), []
        assert response.headers["content-type"].startswith("text/event-stream")
        try:
            for line in response.iter_lines():
                if line.startswith(":"):
                    comments.append((time.monotonic(), line[1:].strip()))
                    if opened:
                        break
                elif line == "":
                    # A block without data (e.g. only `retry:`) dispatches no event.
                    if "data" in current:
                        current["data"] = json.loads(current["data"])
                        events.append(current)
                        if until is not None and until(events):
                            break
                    current = {}
                else:
                    field, _, value = line.partition(":")
                    current[field] = value.removeprefix(" ")
                if time.monotonic() > deadline:
                    break
        except httpx.ReadTimeout:
            pass  # quiet for max_seconds: what came so far is the answer
    return 200, events, comments


def completed(message_id):
    return lambda events: any(
        e.get("event") in ("message.completed", "message.error")
        and e["data"].get("message_id") == message_id
        for e in events
    )


def post_message(api, session, content):
    url = f"/my/projects/{session.project_id}/chat/{session.id}/messages/"
    response = api.post(url, {"content": content}, format="json")
    assert response.status_code == 202, response.content
    return response.json()["assistant_message_id"]


def test_credentials_and_scope(asgi, user, other_user, session):
    url = events_url(asgi, session)
    assert read_sse(url)[0] == 401
    assert read_sse(url, headers={"Authorization": "Token nope"})[0] == 401
    assert read_sse(url, headers={"Authorization": "Token a b"})[0] == 401

    mine = {"Authorization": f"Token {token_for(user)}"}
    theirs = {"Authorization": f"Token {token_for(other_user)}"}
    assert read_sse(url, headers=theirs)[0] == 404  # someone else's project
    own_other = ChatSessionFactory(agent=AgentFactory(project=ProjectFactory(owner=user)))
    # My project with a session of another of my projects: not in this project.
    assert read_sse(events_url(asgi, own_other, project=session.project), headers=mine)[0] == 404
    status, body, _ = read_sse(url, headers=mine, params={"cursor": "yesterday"})
    assert status == 400 and "cursor" in body["detail"]
    assert read_sse(url, headers={**mine, "Last-Event-ID": "1-x"})[0] == 400
    status, events, comments = read_sse(url, headers=mine, opened=True)
    assert status == 200 and events == [] and comments[0][1].startswith("connected")


def test_opening_a_stream_reads_the_database_once(db, user, other_user, session):
    """A stream's authorization (its credential checked in the last
    AUTH_TOKEN_CACHE_SECONDS) looks its session up inside the user's project in one
    query; another user's project, or a session of another project, is still a 404."""
    mine, theirs = (
        RequestFactory().get("/", HTTP_AUTHORIZATION=f"Token {token_for(u)}")
        for u in (user, other_user)
    )
    assert sse._authorize(mine, session.project_id, session.id) == user.pk  # warms the cache
    with CaptureQueriesContext(connection) as queries:
        assert sse._authorize(mine, session.project_id, session.id) == user.pk
    assert len(queries) == 1, [q["sql"] for q in queries.captured_queries]
    own_other = ChatSessionFactory(agent=AgentFactory(project=ProjectFactory(owner=user)))
    for request, session_id in ((theirs, session.id), (mine, own_other.id)):
        with pytest.raises(Http404):
            sse._authorize(request, session.project_id, session_id)


def test_session_cookie_authenticates_too(asgi, user, session):
    client = Client()
    client.force_login(user)
    cookie = client.cookies[settings.SESSION_COOKIE_NAME].value
    status, _events, _ = read_sse(
        events_url(asgi, session),
        headers={"Cookie": f"{settings.SESSION_COOKIE_NAME}={cookie}"},
        opened=True,
    )
    assert status == 200


def test_live_answer_arrives_as_ordered_events(asgi, live_worker, api, user, session, redis_client):
    headers = {"Authorization": f"Token {token_for(user)}"}
    result = {}

    def subscribe():
        result["read"] = read_sse(
            events_url(asgi, session),
            headers=headers,
            until=lambda events: "id" in result and completed(result["id"])(events),
        )

    # Subscribe first, then post: the subscriber sees everything that follows.
    reader = threading.Thread(target=subscribe)
    reader.start()
    wait_until(lambda: sse.active_streams() == 1, what="the subscriber connected")
    result["id"] = answer_id = post_message(api, session, "hello there")
    reader.join(30)
    status, events, _ = result["read"]
    assert status == 200
    kinds = [e["event"] for e in events]
    assert kinds[:2] == ["message.created", "message.created"]
    assert kinds[-1] == "message.completed" and set(kinds[2:-1]) == {"message.delta"}
    assert events[1]["data"]["id"] == answer_id
    stored = [eid for eid, _, _ in stream_events(redis_client, session.project, session.id)]
    assert [e["id"] for e in events] == stored  # every event, once, in stream order
    content = "".join(e["data"]["delta"] for e in events if e["event"] == "message.delta")
    assert content == Message.objects.get(id=answer_id).content


def test_reconnecting_with_last_event_id_loses_and_repeats_nothing(
    asgi, live_worker, api, user, redis_client, fake_openai
):
    fake_openai.mode, fake_openai.delay = "slow", 0.03
    fake_openai.tokens = [f"w{i} " for i in range(40)]
    project = ProjectFactory(owner=user)
    session = ChatSessionFactory(agent=AgentFactory(project=project, model="m"), project=project)
    headers = {"Authorization": f"Token {token_for(user)}"}
    url = events_url(asgi, session)

    answer_id = post_message(api, session, "stream please")
    wait_for_event(redis_client, project, session.id, types={"message.delta"}, message_id=answer_id)
    # First connection (from the start of the stream) drops after a few events...
    _, first, _ = read_sse(
        url, headers=headers, params={"cursor": "0"}, until=lambda e: len(e) >= 5
    )
    assert len(first) == 5
    # ...the next resumes from the last id it saw, while the answer is still streaming.
    _, rest, _ = read_sse(
        url, headers={**headers, "Last-Event-ID": first[-1]["id"]}, until=completed(answer_id)
    )
    ids = [e["id"] for e in first + rest]
    stored = [eid for eid, _, _ in stream_events(redis_client, project, session.id)]
    assert ids == stored and len(set(ids)) == len(ids)
    assert rest[-1]["event"] == "message.completed"

    # ?cursor= does the same as Last-Event-ID: from the third-last event, the last two...
    _, tail, _ = read_sse(
        url, headers=headers, params={"cursor": stored[-3]}, until=lambda e: len(e) >= 2
    )
    assert [e["id"] for e in tail] == stored[-2:]
    # ...and from the last one, nothing old: the next message's events, from its first.
    again = post_message(api, session, "once more")
    _, newer, _ = read_sse(
        url, headers=headers, params={"cursor": stored[-1]}, until=completed(again)
    )
    assert newer[0]["event"] == "message.created" and newer[-1]["event"] == "message.completed"
    assert not {e["id"] for e in newer} & set(stored)


def test_a_cursor_older_than_the_trimmed_stream_is_told_so(asgi, user, session, runtime_settings):
    runtime_settings.CHAT_STREAM_MAXLEN = 10
    redis = scoped(user.id, session.project_id)
    ids = [
        streams.event_append(
            redis=redis, session_id=session.id, event_type="message.delta", data={"n": i}
        )
        for i in range(300)
    ]
    retained = [eid for eid, _ in redis.xrange(streams.stream_key(session.id))]
    assert len(retained) < 300  # Redis trimmed (whole nodes: approximately 10 kept)
    headers = {"Authorization": f"Token {token_for(user)}"}
    url = events_url(asgi, session)

    # Read until the last retained event (a stream never ends by itself; a loaded
    # machine may take a while to send the first byte).
    last = lambda events: events[-1].get("id") == retained[-1]  # noqa: E731
    _, events, _ = read_sse(url, headers=headers, params={"cursor": ids[0]}, until=last)
    assert events[0]["event"] == "stream.truncated" and "id" not in events[0]
    assert events[0]["data"]["first_id"] == retained[0]
    assert [e["id"] for e in events[1:]] == retained
    # A client that saw the retained events resumes without a notice.
    _, events, _ = read_sse(url, headers=headers, params={"cursor": retained[0]}, until=last)
    assert [e["id"] for e in events] == retained[1:]


def test_heartbeats_keep_an_idle_stream_alive(asgi, user, session, runtime_settings):
    runtime_settings.CHAT_HEARTBEAT_SECONDS = 0.2
    headers = {"Authorization": f"Token {token_for(user)}"}
    _, events, comments = read_sse(events_url(asgi, session), headers=headers, max_seconds=1.5)
    beats = [t for t, text in comments if text == "heartbeat"]
    assert events == [] and len(beats) >= 3


def test_deleting_the_project_closes_its_streams(asgi, api, user, session, runtime_settings):
    runtime_settings.CHAT_HEARTBEAT_SECONDS = 0.3
    headers = {"Authorization": f"Token {token_for(user)}"}
    url = events_url(asgi, session)
    result = {}
    reader = threading.Thread(
        target=lambda: result.update(read=read_sse(url, headers=headers, max_seconds=20))
    )
    reader.start()
    wait_until(lambda: sse.active_streams() == 1, what="stream open")
    started = time.monotonic()
    assert api.delete(f"/my/projects/{session.project_id}/").status_code == 204
    reader.join(20)
    assert time.monotonic() - started < 10  # closed by the server, not by the read timeout
    status, events, _ = result["read"]
    assert status == 200 and events[-1]["event"] == "stream.closed"
    assert sse.active_streams() == 0
    assert read_sse(url, headers=headers)[0] == 404


def own_clients(client) -> int:
    """Connections to this test run's database (other runs may share the server)."""
    db = str(client.connection_pool.connection_kwargs.get("db", 0))
    return sum(1 for c in client.client_list() if c.get("db") == db)


def test_disconnects_leave_no_connections_or_generators_behind(asgi, user, session, redis_client):
    token = token_for(user)
    request = (
        f"GET /my/projects/{session.project_id}/chat/{session.id}/events/ HTTP/1.1\r\n"
        f"Host: 127.0.0.1\r\nAuthorization: Token {token}\r\nAccept: text/event-stream\r\n\r\n"
    ).encode()

    def connect() -> socket.socket:
        conn = socket.create_connection(("127.0.0.1", asgi.port), timeout=10)
        conn.sendall(request)
        received = b""
        while b"connected" not in received:
            chunk = conn.recv(4096)
            assert chunk, received
            received += chunk
        assert received.startswith(b"HTTP/1.1 200")
        return conn

    def cycle():
        connect().close()

    def settled():
        return sse.active_streams() == 0

    for _ in range(5):  # warm up: the async pool, the DB, uvicorn
        cycle()
    wait_until(settled, what="streams closed")
    # The counts are taken once the server has finished with every connection (their
    # request tasks ended), not while the last warm-up's still winds down.
    state = asgi.server.server_state
    wait_until(lambda: not state.connections and not state.tasks, what="the server idle")
    clients_before = own_clients(redis_client)
    tasks_before = asgi.task_count()

    # The measures do see open streams: each holds a generator, but no Redis connection
    # of its own (the process's hub serves them all).
    held = [connect() for _ in range(20)]
    wait_until(lambda: sse.active_streams() == 20, what="twenty open streams")
    assert own_clients(redis_client) <= clients_before + 1
    assert asgi.task_count() > tasks_before
    # ...but no thread: an open stream must not pin a request thread for its lifetime.
    assert threads_inside(sse, streamhub, auth) == []
    for conn in held:
        conn.close()
    wait_until(settled, what="held streams closed")

    for _ in range(1000):
        cycle()
    wait_until(settled, timeout=10, what="every stream closed")
    assert sse.active_streams() == 0
    seen = {}

    def nothing_left() -> bool:
        seen.update(clients=own_clients(redis_client), tasks=asgi.task_count())
        # Streams opening at once may take the hub's pool to its size
        # (SSE_REDIS_CONNECTIONS, one more than the warm-up's sequential opens needed), and
        # the request path's own pool (authentication, throttles) one more when requests
        # overlap on a busy machine; never one per stream (1,000 streams were opened).
        return seen["clients"] <= clients_before + 2 and seen["tasks"] <= tasks_before

    try:
        wait_until(nothing_left, what="no connection or task left behind")
    except AssertionError as exc:
        detail = f"now {seen}, before {clients_before=} {tasks_before=}"
        raise AssertionError(f"{exc}: {detail}") from None


def test_only_the_event_stream_is_served_outside_the_request_thread_context(session):
    def scope(path):
        return {"type": "http", "path": path, "root_path": ""}

    base = f"/my/projects/{session.project_id}/chat/{session.id}"
    assert serves_long_lived(scope(f"{base}/events/"))
    for path in (f"{base}/", f"{base}/messages/", "/my/projects/", "/nowhere/events/"):
        assert not serves_long_lived(scope(path)), path


def _stream_open(asgi, session, token) -> tuple[socket.socket, bytes]:
    """A request for an event stream of `session` on a raw connection, held open: the
    connection and its answer's head."""
    conn = socket.create_connection(("127.0.0.1", asgi.port), timeout=10)
    conn.sendall(
        f"GET /my/projects/{session.project_id}/chat/{session.id}/events/ HTTP/1.1\r\n"
        f"Host: 127.0.0.1\r\nAuthorization: Token {token}\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += conn.recv(4096) or b"\r\n\r\n"
    return conn, head.partition(b"\r\n\r\n")[0]


def _stream_opened(asgi, session, token) -> socket.socket:
    conn, head = _stream_open(asgi, session, token)
    assert head.startswith(b"HTTP/1.1 200"), head
    return conn


def test_over_the_cap_a_new_stream_is_a_503_with_retry_after(asgi, user, session, settings):
    settings.SSE_MAX_STREAMS = 2
    token = token_for(user)
    held = [_stream_opened(asgi, session, token) for _ in range(2)]
    wait_until(lambda: sse.active_streams() == 2, what="two open streams")
    response = httpx.get(
        events_url(asgi, session), headers={"Authorization": f"Token {token}"}, timeout=10
    )
    assert response.status_code == 503
    assert response.headers["Retry-After"] and "detail" in response.json()
    for conn in held:
        conn.close()
    wait_until(lambda: sse.active_streams() == 0, what="streams closed")


def test_over_a_users_share_a_new_stream_is_a_429_and_others_still_open(
    asgi, user, other_user, session, settings
):
    """SSE_MAX_STREAMS is the process's: one user holding them all would leave every
    other tenant a 503. Past SSE_MAX_STREAMS_PER_USER, that user's next stream is a 429;
    another user's opens."""
    settings.SSE_MAX_STREAMS_PER_USER = 2
    token = token_for(user)
    held = [_stream_opened(asgi, session, token) for _ in range(2)]
    wait_until(lambda: sse.active_streams() == 2, what="two open streams")
    conn, head = _stream_open(asgi, session, token)
    conn.close()
    assert head.startswith(b"HTTP/1.1 429"), head
    assert b"\r\nretry-after: " in head.lower(), head
    project = ProjectFactory(owner=other_user)
    other = ChatSessionFactory(project=project, agent=AgentFactory(project=project))
    held.append(_stream_opened(asgi, other, token_for(other_user)))
    for conn in held:
        conn.close()
    wait_until(lambda: sse.active_streams() == 0, what="streams closed")
    # Its streams closed, the user opens again.
    _stream_opened(asgi, session, token).close()
    wait_until(lambda: sse.active_streams() == 0, what="the last stream closed")


def test_an_event_whose_notification_was_lost_arrives_by_the_safety_poll(
    asgi, user, session, settings, redis_client
):
    """A writer's notification can be lost (the hub's pub/sub connection reconnecting):
    the hub reads every followed stream every SSE_SAFETY_POLL_SECONDS anyway."""
    settings.SSE_SAFETY_POLL_SECONDS = 0.5
    key = workspace_prefix(user.pk, session.project_id) + stream_key(session.id)
    headers = {"Authorization": f"Token {token_for(user)}"}

    def write_quietly():
        wait_until(lambda: sse.active_streams() == 1, what="the stream open")
        redis_client.xadd(key, {"type": "message.delta", "data": json.dumps({"delta": "hi"})})

    writer = threading.Thread(target=write_quietly)
    writer.start()
    started = time.monotonic()
    _, events, _ = read_sse(
        events_url(asgi, session), headers=headers, until=lambda e: e, max_seconds=5
    )
    writer.join()
    assert [e["event"] for e in events] == ["message.delta"]
    assert time.monotonic() - started < 3


def test_with_rabbitmq_as_the_broker_a_stream_carries_its_events(asgi, user, session, settings):
    """On RabbitMQ the bus keeps a deleted project's tombstone in REDIS_URL, and the hub
    reads it there: it took the broker's AMQP URL for a Redis's, and every stream
    answered 500. The broker is never asked (nothing listens at this one)."""
    settings.CELERY_BROKER_URL = f"amqp://guest:guest@127.0.0.1:{free_port()}//"
    written = streams.event_append(
        redis=scoped(user.id, session.project_id),
        session_id=session.id,
        event_type="message.delta",
        data={"delta": "hi"},
    )
    headers = {"Authorization": f"Token {token_for(user)}"}
    status, events, _ = read_sse(
        events_url(asgi, session), headers=headers, params={"cursor": "0"}, until=bool
    )
    assert status == 200, events
    assert [e["id"] for e in events] == [written]
