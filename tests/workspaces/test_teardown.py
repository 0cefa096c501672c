"""Teardown on project delete, end to end: a real worker, real queues, the real vector
store (Qdrant local mode) behind the agents app's workspace_teardown receiver."""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from agentbus import active
from agentbus.guard import ProjectGone, project_gone
from agentbus.queues import MAINTENANCE_QUEUE, project_queue
from agentbus.transport import unacked_queues
from common.redis import broker_redis, get_redis
from context.vectorstore import (
    TenantScope,
    close_vector_store,
    collection_name,
    get_vector_store,
)
from projects.models import Project
from tests.agentbus.conftest import send
from tests.factories import AgentFactory, ProjectFactory
from tests.runtime.conftest import HOLD_VECTOR_STORE, put_context, stored_agents
from tests.workers import shared_pool_worker, wait_for
from tests.workspaces.conftest import django_process, keys_under, snapshot
from tests.workspaces.tasks import ran, record
from workspaces import registry
from workspaces.manager import get_worker_space
from workspaces.models import WorkspaceTeardown
from workspaces.tasks import sweep
from workspaces.teardown import SUSPECTS_KEY, workspace_sweep, workspace_teardown_run

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]


def collections_of(project) -> list[str]:
    """The logical collection names of the project's agents that hold context."""
    return stored_agents(project)


def expected_collections(project) -> list[str]:
    return sorted(
        collection_name(user_id=project.owner_id, project_id=project.id, agent_id=a.id)
        for a in project.agents.all()
    )


def teardown_row(project_id) -> WorkspaceTeardown | None:
    return WorkspaceTeardown.objects.filter(project_id=project_id).first()


def done(project_id) -> bool:
    row = teardown_row(project_id)
    return row is not None and row.status == WorkspaceTeardown.Status.DONE


def nothing_left(project_id, user_id) -> None:
    assert keys_under(user_id, project_id) == set()
    assert active.queue_depth(project_id) == 0
    assert not get_redis().exists(project_queue(project_id))
    assert project_queue(project_id) not in active.active_queues()
    assert (user_id, project_id) not in registry.index_members()
    scope = TenantScope.project(user_id=user_id, project_id=project_id)
    assert get_vector_store().count(scope) == 0


def all_teardowns_finished() -> bool:
    return (
        not WorkspaceTeardown.objects.filter(status=WorkspaceTeardown.Status.PENDING).exists()
        and get_redis().llen(MAINTENANCE_QUEUE) == 0
    )


@pytest.fixture
def two_projects(api, user, qdrant_path):
    """Projects A and B of one user, each with initialised workspaces and the vector
    collections their agents stored context in (through the API, on a real worker)."""
    a, b = ProjectFactory(owner=user), ProjectFactory(owner=user)
    for project, count in ((a, 3), (b, 2)):
        for _ in range(count):
            AgentFactory(project=project)
    with shared_pool_worker():
        for project in (a, b):
            get_worker_space(user_id=user.pk, project_id=project.id)
            for agent in project.agents.all():
                url = f"/my/projects/{project.id}/agents/{agent.id}/context/"
                response = api.post(url, {"documents": ["remember me"]}, format="json")
                assert response.status_code == 202
        for project in (a, b):
            assert wait_for(
                lambda p=project: sorted(collections_of(p)) == expected_collections(p),
                timeout=60,
            ), collections_of(project)
        # Every message of A and B taken and acknowledged: the worker stops cold, and one
        # it still held unacknowledged (a task finishing) would go back to its queue.
        # (Only theirs: an earlier test's worker may have left one of its own there.)
        ours = {project_queue(p.id) for p in (a, b)}
        assert wait_for(
            lambda: (
                all(active.queue_depth(p.id) == 0 for p in (a, b))
                and not unacked_queues(broker_redis()) & ours
            ),
            timeout=60,
        )
    return a, b


def test_delete_leaves_nothing_and_the_other_project_untouched(api, user, two_projects):
    a, b = two_projects
    # Work queued for both while no worker runs.
    for _ in range(50):
        send(record, user_id=user.pk, project_id=a.id)
    for _ in range(3):
        send(record, user_id=user.pk, project_id=b.id)
    assert active.queue_depth(a.id) == 50
    b_keys, b_collections = snapshot(user.pk, b.id), collections_of(b)

    assert api.delete(f"/my/projects/{a.id}/").status_code == 204
    assert project_gone(a.id)
    assert teardown_row(a.id).status == WorkspaceTeardown.Status.PENDING

    with shared_pool_worker():
        assert wait_for(lambda: done(a.id))
        assert wait_for(lambda: ran(b.id) == 3)  # B's work goes on

    nothing_left(a.id, user.pk)
    assert ran(a.id) == 0  # no task of the deleted project ran
    assert collections_of(b) == b_collections == expected_collections(b)
    assert snapshot(user.pk, b.id) == b_keys
    row = teardown_row(a.id)
    assert row.attempts == 1 and row.last_error == "" and row.completed_at
    # The teardown is idempotent: running it again finds nothing owed.
    assert workspace_teardown_run(user_id=user.pk, project_id=a.id) is None


def test_vector_store_failing_during_delete_then_recovering(api, user, two_projects, qdrant_path):
    a, b = two_projects
    b_collections = collections_of(b)
    close_vector_store()  # this process lets go of the storage folder...
    holder = subprocess.Popen(  # ...and another process takes it: local mode allows one
        [sys.executable, "-c", HOLD_VECTOR_STORE, qdrant_path],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "holding"
        with shared_pool_worker():
            assert api.delete(f"/my/projects/{a.id}/").status_code == 204

            # The teardown runs, the vector store refuses, the task retries with backoff.
            assert wait_for(lambda: teardown_row(a.id).attempts >= 2, timeout=30)
            row = teardown_row(a.id)
            assert row.status == WorkspaceTeardown.Status.PENDING
            assert "already accessed by another instance" in row.last_error
            # What could go, went (an attempt holds the init lock key for a moment).
            assert wait_for(lambda: keys_under(user.pk, a.id) == set())

            holder.kill()  # the store recovers
            holder.wait()
            assert wait_for(lambda: done(a.id), timeout=60)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()

    nothing_left(a.id, user.pk)
    assert teardown_row(a.id).last_error == ""
    assert collections_of(b) == b_collections == expected_collections(b)


def delete_behind_djangos_back(project) -> None:
    with connection.cursor() as cursor:
        for table, column in (
            (
                "agents_run",
                "session_id IN (SELECT id FROM agents_chatsession WHERE project_id = %s)",
            ),
            (
                "agents_message",
                "session_id IN (SELECT id FROM agents_chatsession WHERE project_id = %s)",
            ),
            ("agents_chatsession", "project_id = %s"),
            ("agents_agent", "project_id = %s"),
            ("projects_project", "id = %s"),
        ):
            cursor.execute(
                f"DELETE FROM {table} WHERE {column}",
                [project.id.hex if connection.vendor == "sqlite" else project.id],
            )


def with_workspaces_and_collections(user, *projects) -> None:
    """An agent, an initialised workspace and the agent's collections for each project,
    made here directly: no worker runs, so the projects' queues stay as they are."""
    for project in projects:
        AgentFactory(project=project)
        get_worker_space(user_id=user.pk, project_id=project.id)
        for agent in project.agents.all():
            put_context(agent)


CRASH_AFTER_COMMIT = """
from django.db import transaction
from projects.models import Project
from projects.services import project_delete

project = Project.objects.get(id=sys.argv[1])
with transaction.atomic():
    # Runs first at commit, before the teardown's dispatch: the process dies right
    # after the delete committed.
    transaction.on_commit(lambda: os._exit(17))
    project_delete(project=project)
"""


def test_crash_between_commit_and_dispatch_ends_clean_after_the_sweep(user, qdrant_path):
    a, b = ProjectFactory(owner=user), ProjectFactory(owner=user)
    with_workspaces_and_collections(user, a, b)
    for _ in range(5):
        send(record, user_id=user.pk, project_id=a.id)
    b_keys = snapshot(user.pk, b.id)

    crashed = django_process(CRASH_AFTER_COMMIT, str(a.id))
    assert crashed.wait(timeout=60) == 17, crashed.stderr.read()

    # Committed, but nothing dispatched: the durable row is all that is left of it.
    assert not Project.objects.filter(id=a.id).exists()
    row = teardown_row(a.id)
    assert row.status == WorkspaceTeardown.Status.PENDING and row.dispatched_at is None
    assert not project_gone(a.id)
    assert keys_under(user.pk, a.id) and active.queue_depth(a.id) >= 5

    # A sweep leaves a fresh row to its own dispatch (and takes it for no orphan)...
    first = workspace_sweep()
    assert first["redispatched"] == 0 and first["orphans"] == 0
    assert registry.index_member(user.pk, a.id) not in get_redis().hgetall(SUSPECTS_KEY)
    # ...and dispatches it once it is overdue.
    WorkspaceTeardown.objects.filter(pk=row.pk).update(
        created_at=timezone.now() - timedelta(minutes=2)
    )
    with shared_pool_worker():
        sweep.delay()
        assert wait_for(lambda: done(a.id))
        # No delete answered here, so nothing tombstoned the project until the sweep's
        # teardown: queued tasks may run in that window (agent tasks then find no rows).
        # From the teardown on, none is even queued.
        for _ in range(5):
            with pytest.raises(ProjectGone):
                send(record, user_id=user.pk, project_id=a.id)

    nothing_left(a.id, user.pk)
    assert project_gone(a.id)
    assert snapshot(user.pk, b.id) == b_keys
    assert collections_of(b) == expected_collections(b)


def test_sweep_tears_down_leftovers_with_no_project_row(user, qdrant_path):
    """A project removed behind Django's back (SQL in a database shell: no signal, no
    teardown row) leaves a workspace behind: the sweep finds and removes all of it."""
    gone, kept = ProjectFactory(owner=user), ProjectFactory(owner=user)
    with_workspaces_and_collections(user, gone, kept)
    send(record, user_id=user.pk, project_id=gone.id)
    gone_id = gone.id
    delete_behind_djangos_back(gone)
    kept_keys = snapshot(user.pk, kept.id)

    # The first sweep that sees the leftovers only notes them: a project whose creating
    # transaction has not committed yet looks the same for a moment.
    first = workspace_sweep()
    assert first["orphans"] == 0 and first["suspects"] >= 1
    assert not WorkspaceTeardown.objects.filter(project_id=gone_id).exists()
    with shared_pool_worker():
        sweep.delay(redispatch_after=0)  # the next sweep, once the grace period is over
        assert wait_for(lambda: done(gone_id))
        # (It also tears down what earlier tests left: let those finish too.)
        assert wait_for(all_teardowns_finished)

    nothing_left(gone_id, user.pk)
    assert collections_of(kept) == expected_collections(kept)
    assert snapshot(user.pk, kept.id) == kept_keys
    # Nothing more to do on the next round.
    again = workspace_sweep(redispatch_after=0)
    assert again["redispatched"] == 0 and again["orphans"] == 0
    assert registry.index_member(user.pk, gone_id) not in get_redis().hgetall(SUSPECTS_KEY)


def test_sweep_walks_the_index_in_bounded_batches_from_a_persisted_cursor(user):
    projects = [ProjectFactory(owner=user) for _ in range(5)]
    for project in projects:
        get_worker_space(user_id=user.pk, project_id=project.id)
    members = [m for m, _ in get_redis().zrange(registry.INDEX_KEY, 0, -1, withscores=True)]
    cursor = lambda: get_redis().hget(registry.SWEEP_CURSOR_KEY, "index")  # noqa: E731

    assert workspace_sweep(batch=2)["checked"] == 2 and cursor() == members[1]
    assert workspace_sweep(batch=2)["checked"] == 2 and cursor() == members[3]
    # The end of the index: the next run starts over.
    assert workspace_sweep(batch=2)["checked"] == len(members) - 4 and cursor() == ""
    assert workspace_sweep(batch=2)["checked"] == 2 and cursor() == members[1]


def test_sweep_puts_workspaces_back_in_their_state_sets(user):
    project = ProjectFactory(owner=user)
    get_worker_space(user_id=user.pk, project_id=project.id)
    member = registry.index_member(user.pk, project.id)
    get_redis().zrem(registry.state_key(registry.State.INITIALIZED), member)  # a lost write
    assert registry.state_counts()[1]["Initialized"] == 0
    workspace_sweep()
    assert get_redis().zscore(registry.state_key(registry.State.INITIALIZED), member)


def test_sweep_adopts_the_earlier_index(user):
    project = ProjectFactory(owner=user)
    get_redis().sadd(registry.LEGACY_INDEX_KEY, f"{user.pk}:{project.id.hex}")
    workspace_sweep()
    assert (user.pk, project.id) in registry.index_members()
    assert not get_redis().exists(registry.LEGACY_INDEX_KEY)
