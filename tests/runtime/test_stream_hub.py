"""The stream hub's fan-out and its opening path: every stream of a key gets a new
entry once and in order, and no other stream sees it; a crowd of streams opening at
once does not queue for the hub's few Redis connections; quiet streams get their
heartbeats from the hub."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import uuid

import httpx
import pytest

from chat import events as sse
from realtime import streamhub
from tests.factories import AgentFactory, ChatSessionFactory, ProjectFactory, UserFactory
from tests.redis_server import private_redis
from tests.runtime.conftest import token_for
from tests.workers import wait_until

pytestmark = pytest.mark.slow


def run_with_hub(test):
    """Run `test(hub)` in an event loop of its own, with that loop's hub, closed after."""

    async def main():
        try:
            return await asyncio.wait_for(test(streamhub.get_hub()), timeout=20)
        finally:
            await streamhub.close_hub()

    return asyncio.run(main())


def test_an_entry_reaches_every_stream_of_its_key_once_in_order_and_no_other(redis_client):
    ours, theirs = f"test:hub:{uuid.uuid4().hex}", f"test:hub:{uuid.uuid4().hex}"
    project = uuid.uuid4()

    async def test(hub):
        async with contextlib.AsyncExitStack() as stack:

            async def subscribed(key, count):
                return [
                    await stack.enter_async_context(
                        hub.subscribe(key=key, project_id=project, cursor="0-0")
                    )
                    for _ in range(count)
                ]

            mine, others = await subscribed(ours, 3), await subscribed(theirs, 2)
            written = []
            for n in range(3):
                written.append(redis_client.xadd(ours, {"n": str(n)}))
                redis_client.publish(ours, "")
            for sub in mine:
                got = []
                while len(got) < 3:
                    got += await sub.inbox.get()
                assert [eid for eid, _ in got] == written
                assert [fields["n"] for _, fields in got] == ["0", "1", "2"]
            # What the other key's streams get first is their own entry: nothing of ours
            # (delivered above, before this one was written) reached them.
            own = redis_client.xadd(theirs, {"n": "theirs"})
            redis_client.publish(theirs, "")
            for sub in others:
                assert [eid for eid, _ in await sub.inbox.get()] == [own]
            assert all(sub.inbox.empty() for sub in mine)

    try:
        run_with_hub(test)
    finally:
        redis_client.delete(ours, theirs)


def test_quiet_streams_that_want_heartbeats_get_them_from_the_hub(redis_client, settings):
    settings.CHAT_HEARTBEAT_SECONDS = 0.1
    beating, waiting = f"test:hub:{uuid.uuid4().hex}", f"test:hub:{uuid.uuid4().hex}"
    project = uuid.uuid4()

    async def test(hub):
        async with (
            hub.subscribe(key=beating, project_id=project, cursor="0-0", heartbeat=True) as beat,
            hub.subscribe(key=waiting, project_id=project, cursor="0-0") as wait,
        ):
            assert [await beat.inbox.get(), await beat.inbox.get()] == [streamhub.HEARTBEAT] * 2
            # A subscription that asked for none (a search waiting for its reply) got none.
            own = redis_client.xadd(waiting, {"n": "reply"})
            redis_client.publish(waiting, "")
            assert [eid for eid, _ in await wait.inbox.get()] == [own]

    try:
        run_with_hub(test)
    finally:
        redis_client.delete(waiting)


def test_an_entry_written_between_the_backlog_read_and_the_subscribe_arrives_at_once(
    redis_client, settings
):
    """The backlog read and the SUBSCRIBE go on two connections, so Redis may serve the
    read first. An entry written between them is in neither; it must still come at once,
    not at the next safety poll (set to a minute here)."""
    settings.SSE_SAFETY_POLL_SECONDS = 60
    key = f"test:hub:{uuid.uuid4().hex}"
    written = []

    async def test(hub):
        subscribe, read_after = hub.pubsub.subscribe, hub._read_after

        async def written_then_subscribed(*keys):
            # Written (and its notification published to nobody) before Redis takes
            # the SUBSCRIBE...
            written.append(redis_client.xadd(key, {"n": "between"}))
            redis_client.publish(key, "")
            return await subscribe(*keys)

        async def read_before_it_was_written(k, cursor):
            # ...and after it served the backlog read, which found nothing yet.
            hub._read_after = read_after
            return []

        hub.pubsub.subscribe = written_then_subscribed
        hub._read_after = read_before_it_was_written
        async with hub.subscribe(key=key, project_id=uuid.uuid4(), cursor="0-0") as sub:
            got = await asyncio.wait_for(sub.inbox.get(), timeout=5)
            assert [eid for eid, _ in got] == written

    try:
        run_with_hub(test)
    finally:
        redis_client.delete(key)


def test_streams_opening_at_once_do_not_queue_for_the_hubs_connections(asgi, settings):
    """200 streams of 8 users open at once (each user within its bound on requests being
    set up): their Redis commands go out pipelined, so at no time do they take every
    connection of the hub's pool (SSE_REDIS_CONNECTIONS, one of them the notifications'),
    which would make the next command wait, and past SSE_REDIS_WAIT_SECONDS fail."""
    settings.SSE_SAFETY_POLL_SECONDS = 600  # the patrol's round trip stays out of it
    requests = []
    for _ in range(8):
        user = UserFactory()
        project = ProjectFactory(owner=user)
        agent = AgentFactory(project=project)
        sessions = [ChatSessionFactory(agent=agent, project=project) for _ in range(5)]
        token = token_for(user)
        requests += [
            (
                f"GET /my/projects/{project.id}/chat/{sessions[n % 5].id}/events/ HTTP/1.1\r\n"
                f"Host: 127.0.0.1\r\nAuthorization: Token {token}\r\n\r\n"
            ).encode()
            for n in range(25)
        ]

    async def spy():
        pool = streamhub.get_hub().client.connection_pool
        get_connection, peak = pool.get_connection, [0]

        async def counted(*args, **kwargs):
            connection = await get_connection(*args, **kwargs)
            peak[0] = max(peak[0], len(pool._in_use_connections))
            return connection

        pool.get_connection = counted
        return pool, peak

    httpx.get(f"http://127.0.0.1:{asgi.port}/my/projects/", timeout=10)  # the server's loop
    pool, peak = asgi.run(spy())
    conns = [socket.create_connection(("127.0.0.1", asgi.port), timeout=20) for _ in requests]
    for conn, request in zip(conns, requests, strict=True):
        conn.sendall(request)
    for conn in conns:
        received = b""
        while b"connected at" not in received:
            chunk = conn.recv(4096)
            assert chunk, received
            received += chunk
        assert received.startswith(b"HTTP/1.1 200"), received[:200]
    wait_until(lambda: sse.active_streams() == 200, what="200 open streams")
    assert peak[0] < pool.max_connections
    for conn in conns:
        conn.close()
    wait_until(lambda: sse.active_streams() == 0, what="streams closed")


def test_a_stream_opening_while_redis_is_down_waits_for_it_and_gets_what_follows(settings, caplog):
    """Redis is down as a subscription opens (its response has begun): the hub waits for
    Redis (up to SSE_REDIS_WAIT_SECONDS) instead of failing the stream, subscribes once
    Redis is back, and the stream gets what is written then. Past the wait, the opening
    fails with StreamUnavailable (its caller ends the stream, telling the client)."""
    settings.SSE_REDIS_WAIT_SECONDS = 15
    key = f"test:hub:{uuid.uuid4().hex}"
    with private_redis() as server:
        settings.REDIS_URL = settings.CELERY_BROKER_URL = server.url
        server.kill()

        async def test(hub):
            subscription = hub.subscribe(key=key, project_id=uuid.uuid4(), cursor="0-0")
            opening = asyncio.create_task(subscription.__aenter__())
            while not any("stream opens; waiting" in r.getMessage() for r in caplog.records):
                assert not opening.done(), opening
                await asyncio.sleep(0.02)
            server.start()
            sub = await opening
            client = server.client()
            written = client.xadd(key, {"n": "after"})
            client.publish(key, "")
            assert [eid for eid, _ in await sub.inbox.get()] == [written]
            await subscription.__aexit__(None, None, None)

        run_with_hub(test)

        settings.SSE_REDIS_WAIT_SECONDS = 0.3
        server.kill()

        async def gives_up(hub):
            with pytest.raises(streamhub.StreamUnavailable):
                async with hub.subscribe(key=key, project_id=uuid.uuid4(), cursor="0-0"):
                    pass

        run_with_hub(gives_up)


def test_a_stream_opening_on_a_redis_that_stalls_gives_up_within_its_wait(settings):
    """A Redis that accepts connections but answers nothing (here CLIENT PAUSE) holds a
    stream's opening one REDIS_SOCKET_TIMEOUT_SECONDS per try, and the opening gives up
    (StreamUnavailable) once SSE_REDIS_WAIT_SECONDS is spent, not when Redis answers
    again. The pause outlasts the bound."""
    settings.REDIS_SOCKET_TIMEOUT_SECONDS = 1
    settings.SSE_REDIS_WAIT_SECONDS = 1
    with private_redis() as server:
        settings.REDIS_URL = settings.CELERY_BROKER_URL = server.url
        server.client().execute_command("CLIENT", "PAUSE", 15_000, "ALL")

        async def test(hub):
            started = asyncio.get_running_loop().time()
            with pytest.raises(streamhub.StreamUnavailable):
                async with hub.subscribe(
                    key="test:hub:stall", project_id=uuid.uuid4(), cursor="0-0"
                ):
                    pass
            return asyncio.get_running_loop().time() - started

        took = run_with_hub(test)
        assert took < 10, took  # about 2 s: two tries of 1 s; else the pause's 15 s
