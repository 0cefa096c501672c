"""Two workspaces never touch each other's keys."""

from __future__ import annotations

import pytest

from agents.selectors import agent_config
from common.redis import get_redis
from context import store_owner
from projects.services import project_delete
from tests.factories import AgentFactory, ProjectFactory, UserFactory
from tests.workspaces.conftest import keys_under, snapshot
from workspaces import registry
from workspaces.manager import get_worker_space
from workspaces.redis import workspace_prefix
from workspaces.registry import State
from workspaces.teardown import workspace_teardown_run

pytestmark = pytest.mark.django_db


def all_keys() -> dict[str, bytes]:
    raw = get_redis()
    return {k: raw.execute_command("DUMP", k, NEVER_DECODE=True) for k in raw.scan_iter("*")}


def test_one_workspaces_whole_life_touches_only_its_own_prefix(user, qdrant_path):
    a = ProjectFactory(owner=user)
    b = ProjectFactory(owner=user)  # same user, another project
    c = ProjectFactory(owner=UserFactory())  # another user
    for project in (a, b, c):
        AgentFactory(project=project)
        AgentFactory(project=project)
    for project in (a, b, c):
        get_worker_space(user_id=project.owner_id, project_id=project.id)
    others = {p.id: snapshot(p.owner_id, p.id, skip=()) for p in (b, c)}
    assert all(others.values())
    before = all_keys()

    # Everything a workspace does in its life, on A.
    space = get_worker_space(user_id=a.owner_id, project_id=a.id)
    new = AgentFactory(project=a)
    space.add_agent(agent_config(new))
    space.agent_cache.clear()
    space.get_agent(new.id)
    space.remove_agent(new.id)
    space.reset()
    space.initialize()
    a_id, owner = a.id, a.owner_id
    project_delete(project=a)  # (this test's transaction never commits: run it here)
    workspace_teardown_run(user_id=owner, project_id=a_id)

    assert {p.id: snapshot(p.owner_id, p.id, skip=()) for p in (b, c)} == others
    after = all_keys()
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    a_prefix = workspace_prefix(owner, a_id)
    # Besides A's own keys: the registry index and its per-state sets (B and C keep their
    # places in them), the bus's active set and A's tombstone, and A's queue (agent
    # tasks H3's receivers published), which teardown purged.
    for project in (b, c):
        member = registry.index_member(project.owner_id, project.id)
        assert get_redis().zscore(registry.state_key(State.INITIALIZED), member) is not None
        assert get_redis().zscore(registry.INDEX_KEY, member) == 0
    shared = {
        registry.INDEX_KEY,
        *(registry.state_key(state) for state in State),
        "uws:bus:active",
        "uws:bus:retired",  # the bus watches a retired queue for messages put back
        f"uws:bus:tombstone:{a_id.hex}",
        store_owner.LEASE_KEY,  # the embedded vector store's owner (not a tenant's)
    }
    assert {k for k in changed if not k.startswith(a_prefix)} <= shared | {
        f"uws.project.{a_id.hex}"
    }
    assert not keys_under(owner, a_id)


def test_a_scoped_client_cannot_name_another_workspaces_key(user):
    a = ProjectFactory(owner=user)
    b = ProjectFactory(owner=user)
    space_a = get_worker_space(user_id=user.pk, project_id=a.id)
    space_b = get_worker_space(user_id=user.pk, project_id=b.id)
    b_state_key = space_b.redis.key("state")

    # Naming B's full key through A's client lands under A's prefix, not on B's key.
    assert space_a.redis.hgetall(b_state_key) == {}
    space_a.redis.set(b_state_key, "x")
    assert get_redis().type(b_state_key) == "hash"
    assert space_a.redis.key(b_state_key).startswith(space_a.redis.prefix)
    with pytest.raises(AttributeError):
        space_a.redis.keys  # noqa: B018  (unscoped commands are refused)
