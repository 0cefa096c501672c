"""Many threads and several processes hitting a new project at once produce exactly one
initialisation."""

from __future__ import annotations

import threading

import pytest

from common.redis import get_redis
from tests.factories import AgentFactory, ProjectFactory
from tests.workspaces.conftest import CountingAgentSource, django_process, read_json_line
from workspaces import registry
from workspaces.manager import get_worker_space
from workspaces.redis import scoped
from workspaces.registry import State
from workspaces.sources import agent_source, register_agent_source

GO_KEY = "uws:test:workspaces:go"

# Run in each process: THREADS threads wait for the go signal, then all ask for the
# workspace; the process reports what it saw.
HAMMER = """
import json, threading
from workspaces.manager import get_worker_space
from common.redis import get_redis
from tests.workspaces.conftest import CountingAgentSource
from workspaces.sources import agent_source, register_agent_source

user_id, project_id, threads = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
counting = CountingAgentSource(agent_source())
register_agent_source(counting)
barrier = threading.Barrier(threads)
spaces, errors = [], []

def hit():
    barrier.wait()
    try:
        spaces.append(get_worker_space(user_id=user_id, project_id=project_id))
    except Exception as exc:
        errors.append(repr(exc))

workers = [threading.Thread(target=hit) for _ in range(threads)]
print(json.dumps({"ready": True}), flush=True)
get_redis().blpop(["uws:test:workspaces:go"], timeout=60)
for t in workers: t.start()
for t in workers: t.join()
print(json.dumps({
    "objects": len({id(s) for s in spaces}),
    "initialized_here": any(s.initialized_here for s in spaces),
    "init_count": spaces[0].init_count if spaces else None,
    "loads": counting.loads,
    "errors": errors,
}), flush=True)
"""


def test_many_threads_initialise_once(transactional_db, user):
    project = ProjectFactory(owner=user)
    agents = [AgentFactory(project=project) for _ in range(4)]
    source = agent_source()
    counting = CountingAgentSource(source)
    register_agent_source(counting)
    barrier = threading.Barrier(24)
    spaces, errors = [], []

    def hit():
        barrier.wait()
        try:
            spaces.append(get_worker_space(user_id=user.pk, project_id=project.id))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=hit) for _ in range(24)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        register_agent_source(source)

    assert errors == []
    assert len({id(s) for s in spaces}) == 1
    entry = registry.read(scoped(user.pk, project.id), user.pk, project.id)
    assert entry.state is State.INITIALIZED and entry.init_count == 1
    assert [sorted(s) for s in counting.loads] == [sorted(str(a.id) for a in agents)]


@pytest.mark.slow
def test_several_processes_initialise_once(transactional_db, user):
    project = ProjectFactory(owner=user)
    agents = [AgentFactory(project=project) for _ in range(4)]
    procs = [django_process(HAMMER, str(user.pk), str(project.id), "8") for _ in range(3)]
    try:
        for proc in procs:
            assert read_json_line(proc)["ready"]
        get_redis().rpush(GO_KEY, *["go"] * len(procs))
        reports = [read_json_line(proc) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()

    assert [r["errors"] for r in reports] == [[]] * len(procs)
    assert all(r["objects"] == 1 for r in reports)  # one handle per process
    assert [r["initialized_here"] for r in reports].count(True) == 1
    assert all(r["init_count"] == 1 for r in reports)
    entry = registry.read(scoped(user.pk, project.id), user.pk, project.id)
    assert entry.state is State.INITIALIZED and entry.init_count == 1
    # The agents were loaded once, by the initialising process.
    sent = [s for r in reports for s in r["loads"]]
    assert [sorted(s) for s in sent] == [sorted(str(a.id) for a in agents)]
    # A process arriving later attaches.
    here = get_worker_space(user_id=user.pk, project_id=project.id)
    assert not here.initialized_here and here.init_count == 1
