"""Fixtures of the agent runtime tests: Qdrant local mode in a temporary folder, the
bundled embedder, the offline provider unless a test points the runtime at the local
OpenAI-protocol server."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import uvicorn
from rest_framework.authtoken.models import Token

from agentbus import transport
from agentbus.queues import project_queue
from chat.streams import stream_key
from common.redis import broker_redis
from context.vectorstore import ContextPoint, TenantScope, close_vector_store, get_vector_store
from realtime.streamhub import close_hub
from tests.redis_server import private_redis
from tests.runtime.openai_server import FakeOpenAI
from tests.workers import broker_at, wait_until
from workspaces.redis import workspace_prefix


@pytest.fixture(scope="session")
def qdrant_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("qdrant")
    yield str(path)
    close_vector_store()


@pytest.fixture(autouse=True)
def runtime_settings(settings, qdrant_path):
    settings.QDRANT_PATH = qdrant_path
    settings.QDRANT_URL = ""
    settings.OPENAI_BASE_URL = ""
    settings.OPENAI_API_KEY = ""
    settings.EMBEDDINGS_BASE_URL = ""
    settings.LLM_MAX_RETRIES = 0
    settings.LLM_TIMEOUT_SECONDS = 5
    return settings


@pytest.fixture(params=["empty", "aof"])
def own_redis(request, settings):
    """A Redis of this test's own for everything (registry, streams, broker, the rate
    limits' cache); `aof` ones come back from their append-only file when restarted."""
    with private_redis(appendonly=request.param == "aof") as server, broker_at(server.url):
        settings.REDIS_URL = settings.CELERY_BROKER_URL = server.url
        settings.CACHES = {"default": {**settings.CACHES["default"], "LOCATION": server.url}}
        server.mode = request.param
        yield server


@pytest.fixture
def fake_openai(runtime_settings):
    server = FakeOpenAI().start()
    runtime_settings.OPENAI_BASE_URL = server.base_url
    runtime_settings.OPENAI_API_KEY = "test-key"
    yield server
    server.stop()


def stream_events(redis_client, project, session_id) -> list[tuple[str, str, dict]]:
    """Every event of a session's stream as (id, type, data)."""
    key = workspace_prefix(project.owner_id, project.id) + stream_key(session_id)
    return [
        (eid, fields["type"], json.loads(fields["data"]))
        for eid, fields in redis_client.xrange(key)
    ]


def wait_for_event(redis_client, project, session_id, *, types, message_id=None, timeout=20):
    """Poll the session's stream until an event of one of `types` (for the message) lands."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for _eid, kind, data in stream_events(redis_client, project, session_id):
            if kind in types and (message_id is None or data.get("message_id") == message_id):
                return kind, data
        time.sleep(0.02)
    raise AssertionError(f"no {types} event within {timeout}s")


def threads_inside(*modules) -> list[str]:
    """The threads of this process whose stack is in one of `modules` (source files) right
    now. A request that waits without a thread is a suspended coroutine, on no thread's
    stack; one that holds a thread shows here however many other threads the process
    runs, so the measure is this code's own, not the process's thread count."""
    files = tuple(str(Path(module.__file__).resolve()) for module in modules)
    names = {thread.ident: thread.name for thread in threading.enumerate()}
    found = []
    for ident, frame in sys._current_frames().items():
        while frame is not None:
            if str(Path(frame.f_code.co_filename).resolve()) in files:
                found.append(names.get(ident, str(ident)))
                break
            frame = frame.f_back
    return found


def queued_task_names(project_id) -> list[str]:
    """Names of the tasks waiting in a project's AgentBus queue."""
    names = []
    for key in transport.lane_keys(project_queue(project_id)):  # both lanes
        for raw in broker_redis().lrange(key, 0, -1):
            names.append(json.loads(raw)["headers"]["task"])
    return names


class AsgiServer:
    def __init__(self) -> None:
        # config.asgi sets tracing and the middleware up from settings as it loads: at first
        # use (the test's settings), not at collection
        from config.asgi import django_application as django_app

        self.loop: asyncio.AbstractEventLoop | None = None

        async def app(scope, receive, send):
            self.loop = asyncio.get_running_loop()
            await django_app(scope, receive, send)

        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(app, lifespan="off", log_level="warning", timeout_keep_alive=1)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def start(self) -> AsgiServer:
        self.thread.start()
        wait_until(lambda: self.server.started, timeout=10, what="uvicorn start")
        return self

    def run(self, coro, timeout=10):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def task_count(self) -> int:
        async def count():
            return len(asyncio.all_tasks())

        return self.run(count())

    def stop(self) -> None:
        if self.loop is not None:
            self.run(close_hub())
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()


@pytest.fixture
def asgi(transactional_db):
    server = AsgiServer().start()
    yield server
    server.stop()


def token_for(user) -> str:
    return Token.objects.get_or_create(user=user)[0].key


def stored_agents(project) -> list[str]:
    """The logical collection names of the project's agents that hold vector context."""
    return sorted(
        scope.collection
        for scopes in get_vector_store().contexts().values()
        for scope in scopes
        if scope.project_id == project.id and scope.user_id == project.owner_id
    )


def context_count(agent) -> int:
    return get_vector_store().count(
        TenantScope.agent(
            user_id=agent.project.owner_id, project_id=agent.project_id, agent_id=agent.id
        )
    )


def put_context(agent, *, dim: int = 8, user_id: int | None = None) -> None:
    """One point in the agent's context, written straight to the store (no worker)."""
    scope = TenantScope.agent(
        user_id=agent.project.owner_id if user_id is None else user_id,
        project_id=agent.project_id,
        agent_id=agent.id,
    )
    point = ContextPoint(str(uuid.uuid4()), [1.0] + [0.0] * (dim - 1), {"text": "remember me"})
    get_vector_store().upsert(scope, [point], model="test-model", dim=dim)


HOLD_VECTOR_STORE = """
import sys
from pathlib import Path
from qdrant_edge import EdgeShard
shards = [EdgeShard.load(str(p)) for p in sorted(Path(sys.argv[1], "edge").iterdir())]
print("holding", flush=True)
sys.stdin.read()
"""
