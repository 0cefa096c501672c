"""WorkerSpaceManager and UserWorkerSpace: lazy initialisation, the cached fast path,
revalidation against the registry, failures, eviction and shutdown."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
import uuid

import pytest
from celery.signals import worker_shutdown
from redis.connection import AbstractConnection

from agents.selectors import agent_config
from tests.factories import AgentFactory, ProjectFactory
from tests.workers import wait_for
from tests.workspaces.conftest import keys_under, snapshot
from workspaces import registry
from workspaces.exceptions import WorkspaceGone, WorkspaceUnavailable
from workspaces.manager import get_worker_space, get_worker_space_manager
from workspaces.redis import scoped
from workspaces.registry import State
from workspaces.space import UserWorkerSpace

pytestmark = pytest.mark.django_db


def entry_of(space):
    return registry.read(space.redis, space.user_id, space.project_id)


def test_first_use_initialises_loads_agents_and_fills_the_cache(project_with_agents):
    project, agents = project_with_agents
    ids = sorted(str(a.id) for a in agents)

    space = get_worker_space(user_id=project.owner_id, project_id=project.id)

    assert space.key == f"{project.owner_id}_{project.id}"
    assert space.state is State.INITIALIZED and space.initialized_here
    assert sorted(space.agent_cache.ids()) == ids
    assert sorted(space.agent_ids) == ids
    assert space.get_agent(agents[0].id)["system_prompt"] == agents[0].system_prompt
    entry = entry_of(space)
    assert entry.state is State.INITIALIZED and entry.init_count == 1
    assert entry.agent_ids == ids and entry.initialized_at and entry.last_used
    assert registry.index_members() == [(project.owner_id, project.id)]


def test_later_calls_take_the_fast_path_without_touching_redis(project_with_agents, monkeypatch):
    project, _ = project_with_agents
    first = get_worker_space(user_id=project.owner_id, project_id=project.id)

    # This thread's own commands, counted where every client of the process sends them
    # (a server-wide counter would also count whatever else talks to the server).
    me, sent = threading.get_ident(), []
    send = AbstractConnection.send_packed_command

    def counted(connection, command, check_health=True):
        if threading.get_ident() == me:
            sent.append(command)
        return send(connection, command, check_health=check_health)

    monkeypatch.setattr(AbstractConnection, "send_packed_command", counted)
    for _ in range(1000):
        assert get_worker_space(user_id=project.owner_id, project_id=str(project.id)) is first
    commands = list(sent)
    monkeypatch.undo()
    assert commands == []
    assert entry_of(first).init_count == 1


def test_a_workspace_of_a_missing_or_foreign_project_is_gone(user, other_user):
    project = ProjectFactory(owner=user)
    with pytest.raises(WorkspaceGone):
        get_worker_space(user_id=user.pk, project_id=uuid.uuid4())
    with pytest.raises(WorkspaceGone):
        get_worker_space(user_id=other_user.pk, project_id=project.id)
    # Nothing was written for either.
    assert registry.index_members() == []
    assert not keys_under(other_user.pk, project.id)


def test_registry_flush_is_rebuilt_from_the_database(project_with_agents, redis_client, settings):
    project, agents = project_with_agents
    space = get_worker_space(user_id=project.owner_id, project_id=project.id)
    redis_client.flushdb()  # Redis loses everything: no data is lost, it is rebuilt

    time.sleep(settings.WORKSPACE_REVALIDATE_SECONDS + 0.05)
    again = get_worker_space(user_id=project.owner_id, project_id=project.id)

    assert again is space and space.initialized
    entry = entry_of(space)
    assert entry.state is State.INITIALIZED and entry.init_count == 1
    assert sorted(entry.agent_ids) == sorted(str(a.id) for a in agents)


def test_reset_elsewhere_reinitialises_here_after_revalidation(project_with_agents, settings):
    project, agents = project_with_agents
    space = get_worker_space(user_id=project.owner_id, project_id=project.id)
    # Another process's handle resets the shared workspace.

    UserWorkerSpace(user_id=project.owner_id, project_id=project.id).reset()
    assert entry_of(space).state is State.NOT_INITIALIZED
    assert space.agent_cache.size() == 0

    # Until revalidation the fast path serves the handle; then it initialises again.
    time.sleep(settings.WORKSPACE_REVALIDATE_SECONDS + 0.05)
    get_worker_space(user_id=project.owner_id, project_id=project.id)
    entry = entry_of(space)
    assert entry.state is State.INITIALIZED and entry.init_count == 2
    assert space.agent_cache.size() == len(agents)


def test_failed_initialisation_is_error_then_the_next_use_retries(
    project_with_agents, redis_client
):
    project, agents = project_with_agents
    # A real Redis failure inside initialisation: the registry index holds a string.
    redis_client.set(registry.INDEX_KEY, "not a set")

    with pytest.raises(WorkspaceUnavailable, match="could not be initialised"):
        get_worker_space(user_id=project.owner_id, project_id=project.id)

    space = scoped(project.owner_id, project.id)
    entry = registry.read(space, project.owner_id, project.id)
    assert entry.state is State.ERROR and "WRONGTYPE" in entry.error
    assert get_worker_space_manager().get(user_id=project.owner_id, project_id=project.id) is None

    redis_client.delete(registry.INDEX_KEY)
    again = get_worker_space(user_id=project.owner_id, project_id=project.id)

    assert again.initialized and again.agent_cache.size() == len(agents)
    entry = registry.read(space, project.owner_id, project.id)
    assert entry.state is State.INITIALIZED and entry.error == "" and entry.init_count == 1


def test_cache_miss_loads_from_the_database_and_refills(project_with_agents):
    project, agents = project_with_agents
    space = get_worker_space(user_id=project.owner_id, project_id=project.id)
    space.agent_cache.clear()

    config = space.get_agent(agents[1].id)

    assert config["id"] == str(agents[1].id) and config["name"] == agents[1].name
    assert space.agent_cache.peek(agents[1].id) == config
    # Another project's agent, a missing one and garbage are all None, and cache nothing.
    foreign = AgentFactory()
    assert space.get_agent(foreign.id) is None
    assert space.get_agent(uuid.uuid4()) is None
    assert space.get_agent("not-a-uuid") is None
    assert space.agent_cache.ids() == {str(agents[1].id)}


def test_add_agent_refuses_another_projects_agent(project_with_agents):
    project, _ = project_with_agents
    space = get_worker_space(user_id=project.owner_id, project_id=project.id)
    foreign = AgentFactory()
    with pytest.raises(ValueError):
        space.add_agent(agent_config(foreign))
    assert str(foreign.id) not in space.agent_cache.ids()


def test_in_use_while_a_request_holds_it(project_with_agents):
    project, _ = project_with_agents
    space = get_worker_space(user_id=project.owner_id, project_id=project.id)
    with space.use():
        assert space.state is State.IN_USE
        with space.use():
            assert space.state is State.IN_USE
        assert space.state is State.IN_USE
    assert space.state is State.INITIALIZED


def test_idle_and_lru_eviction_release_only_this_process(user, settings):
    settings.WORKSPACE_MAX_IN_MEMORY = 3
    settings.WORKSPACE_IDLE_SECONDS = 60
    manager = get_worker_space_manager()
    projects = [ProjectFactory(owner=user) for _ in range(5)]
    for project in projects:
        get_worker_space(user_id=user.pk, project_id=project.id)
        time.sleep(0.002)  # distinct last-use times

    held = {s.project_id for s in manager.spaces()}
    assert held == {p.id for p in projects[2:]}  # the two least recently used went
    # Eviction left the shared state alone.
    for project in projects:
        space = scoped(user.pk, project.id)
        assert registry.read(space, user.pk, project.id).state is State.INITIALIZED

    # Idle ones go too, except one in use.
    settings.WORKSPACE_IDLE_SECONDS = 0.05
    busy = manager.get(user_id=user.pk, project_id=projects[4].id)
    with busy.use():
        time.sleep(0.1)
        assert manager.evict_idle() == 2
        assert manager.spaces() == [busy]

    # An evicted workspace comes back by attaching, not initialising again.
    again = get_worker_space(user_id=user.pk, project_id=projects[0].id)
    assert again.initialized and not again.initialized_here
    assert entry_of(again).init_count == 1


def test_fast_path_evicts_idle_workspaces_as_time_passes(user, settings):
    settings.WORKSPACE_IDLE_SECONDS = 0.05
    manager = get_worker_space_manager()
    old, new = ProjectFactory(owner=user), ProjectFactory(owner=user)
    get_worker_space(user_id=user.pk, project_id=old.id)
    time.sleep(0.1)
    get_worker_space(user_id=user.pk, project_id=new.id)
    get_worker_space(user_id=user.pk, project_id=new.id)
    assert [s.project_id for s in manager.spaces()] == [new.id]


def test_cleanup_all_releases_the_process_and_keeps_shared_state(project_with_agents):
    project, _ = project_with_agents
    other = ProjectFactory(owner=project.owner)
    spaces = [get_worker_space(user_id=project.owner_id, project_id=p.id) for p in (project, other)]
    before = {p.id: snapshot(project.owner_id, p.id, skip=()) for p in (project, other)}
    index = registry.index_members()

    get_worker_space_manager().cleanup_all()

    assert get_worker_space_manager().spaces() == []
    assert all(s.state is State.CLEANED for s in spaces)
    assert {p.id: snapshot(project.owner_id, p.id, skip=()) for p in (project, other)} == before
    assert registry.index_members() == index
    # The next request attaches to the shared state again.
    again = get_worker_space(user_id=project.owner_id, project_id=project.id)
    assert again.initialized and not again.initialized_here


def test_shutdown_waits_for_the_uses_in_flight(project_with_agents):
    """Initialized -> Shutdown (observable while a run still uses the workspace) ->
    Cleaned once it ends, or once the wait runs out."""
    project, _ = project_with_agents
    space = get_worker_space(user_id=project.owner_id, project_id=project.id)
    release = threading.Event()
    entered = threading.Event()

    def run():
        with space.use():
            entered.set()
            release.wait(5)

    worker = threading.Thread(target=run)
    worker.start()
    entered.wait(5)
    cleanup = threading.Thread(target=get_worker_space_manager().cleanup_all)
    cleanup.start()
    # The cleanup marks the workspace shut down, then waits for the use (released below).
    assert wait_for(lambda: space.state is State.SHUTDOWN, timeout=5)
    assert cleanup.is_alive()
    release.set()
    cleanup.join(5)
    worker.join(5)
    assert space.state is State.CLEANED

    stuck = get_worker_space(user_id=project.owner_id, project_id=project.id)
    with stuck.use():
        started = time.monotonic()
        get_worker_space_manager().cleanup_all(wait=0.2)
        assert 0.15 < time.monotonic() - started < 2
        assert stuck.state is State.CLEANED


def test_a_failing_revalidation_reports_unavailable_not_a_500(project_with_agents, settings):
    """Redis refusing a command during revalidation surfaces as WorkspaceUnavailable."""
    project, _ = project_with_agents
    space = get_worker_space(user_id=project.owner_id, project_id=project.id)
    space.redis.delete("state")
    space.redis.set("state", "a string, not the registry hash")  # WRONGTYPE for HMGET
    time.sleep(settings.WORKSPACE_REVALIDATE_SECONDS + 0.05)
    with pytest.raises(WorkspaceUnavailable):
        get_worker_space(user_id=project.owner_id, project_id=project.id)


@pytest.mark.parametrize("how", ["asgi lifespan", "celery worker shutdown"])
def test_shutdown_hooks_release_the_process_and_keep_shared_state(how, project_with_agents):
    # config.asgi sets tracing and the middleware up from settings as it loads: at first use
    from config.asgi import application

    project, _ = project_with_agents
    space = get_worker_space(user_id=project.owner_id, project_id=project.id)
    before = snapshot(project.owner_id, project.id, skip=())

    if how == "asgi lifespan":
        inbox = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
        sent = []

        async def receive():
            return inbox.pop(0)

        async def send(message):
            sent.append(message["type"])

        handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        asyncio.run(application({"type": "lifespan"}, receive, send))
        assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
        # The signals' handlers it chained while it served are given back.
        assert {sig: signal.getsignal(sig) for sig in handlers} == handlers
    else:
        worker_shutdown.send(sender=None)

    assert get_worker_space_manager().spaces() == [] and space.state is State.CLEANED
    assert snapshot(project.owner_id, project.id, skip=()) == before
