"""Operators: GET /admin/workspaces/health and /stats (staff only), and the Django admin
page over the registry with its reset and tear-down actions."""

from __future__ import annotations

import uuid

import pytest
from rest_framework.test import APIClient

from common.redis import get_redis
from tests.agentbus.conftest import send
from tests.factories import AgentFactory, ProjectFactory, UserFactory
from tests.workspaces.conftest import keys_under
from tests.workspaces.tasks import record
from workspaces import registry
from workspaces.exceptions import WorkspaceUnavailable
from workspaces.manager import get_worker_space
from workspaces.models import WorkspaceTeardown
from workspaces.redis import scoped
from workspaces.registry import State

HEALTH, STATS = "/admin/workspaces/health", "/admin/workspaces/stats"


@pytest.fixture
def staff(db):
    return UserFactory(is_staff=True, is_superuser=True)


@pytest.fixture
def staff_api(staff):
    client = APIClient()
    client.force_authenticate(staff)
    return client


@pytest.mark.django_db
@pytest.mark.parametrize(
    "url", [HEALTH, STATS, "/admin/workspaces/health/projects/00000000-0000-4000-8000-000000000001"]
)
def test_staff_only(url, api):
    assert APIClient().get(url).status_code == 401
    assert api.get(url).status_code == 403  # authenticated, not staff


@pytest.mark.django_db
@pytest.mark.parametrize("tail", ["null,null", "not-a-uuid/"])
def test_a_project_health_path_that_is_no_project_id_is_404(staff_api, tail):
    response = staff_api.get(f"/admin/workspaces/health/projects/{tail}")
    assert response.status_code == 404
    assert response.json()["code"] == "not_found"


@pytest.mark.django_db
def test_stats_lists_every_workspace_in_its_shape(staff_api, user, other_user):
    mine = ProjectFactory(owner=user)
    agents = [AgentFactory(project=mine) for _ in range(2)]
    theirs = ProjectFactory(owner=other_user)
    for project in (mine, theirs):
        get_worker_space(user_id=project.owner_id, project_id=project.id)
    send(record, user_id=user.pk, project_id=mine.id)

    body = staff_api.get(STATS).json()

    assert body["active_spaces"] == 2 and body["total_spaces"] == 2
    space = body["spaces"][f"{user.pk}_{mine.id}"]
    assert space["user_id"] == user.pk and space["project_id"] == str(mine.id)
    assert space["initialized"] is True and space["state"] == "Initialized"
    assert space["active_agents"] == 2 and space["cache_size"] == 2
    assert sorted(space["agent_ids"]) == sorted(str(a.id) for a in agents)
    assert space["initialization_time"] and space["last_used"]
    assert space["queue_depth"] == 1  # the record task
    assert body["process"]["in_memory"] == 2
    assert set(body["spaces"]) == {f"{user.pk}_{mine.id}", f"{other_user.pk}_{theirs.id}"}

    page = staff_api.get(STATS, {"limit": 1, "offset": 1}).json()
    # Sorted by (user, project): user 100 after user 99, not as text.
    in_order = sorted(body["spaces"], key=lambda k: (int(k.split("_")[0]), k))
    assert list(page["spaces"]) == in_order[1:]
    bad = staff_api.get(STATS, {"limit": 0})
    assert bad.status_code == 400 and "limit" in bad.json()


@pytest.mark.django_db
def test_health_reports_each_workspace_and_its_problems(staff_api, user):
    good = ProjectFactory(owner=user)
    AgentFactory(project=good)
    broken = ProjectFactory(owner=user)
    AgentFactory(project=broken)
    get_worker_space(user_id=user.pk, project_id=good.id)
    # Initialisation fails on a real Redis error (the registry index is not a set),
    # and the registry records the failure.
    get_redis().set(registry.INDEX_KEY, "not a set")
    with pytest.raises(WorkspaceUnavailable):
        get_worker_space(user_id=user.pk, project_id=broken.id)
    get_redis().delete(registry.INDEX_KEY)
    registry.index_add(user.pk, good.id)
    registry.index_add(user.pk, broken.id)

    response = staff_api.get(HEALTH)
    body = response.json()

    assert response.status_code == 503 and body["healthy"] is False
    assert body["total_spaces"] == 2 and body["healthy_spaces"] == 1
    assert body["unhealthy_spaces"] == [f"{user.pk}_{broken.id}"]
    detail = body["details"][f"{user.pk}_{good.id}"]
    assert detail == {
        "healthy": True,
        "agents": 1,
        "initialized": True,
        "state": "Initialized",
        "queue_depth": detail["queue_depth"],
        "problems": [],
    }
    problems = body["details"][f"{user.pk}_{broken.id}"]["problems"]
    assert problems and "WRONGTYPE" in problems[0]
    for name in ("database", "redis", "broker"):
        assert body["checks"][name]["healthy"] is True, body["checks"][name]
    assert body["checks"]["workers"]["healthy"] is False  # no worker is running
    assert body["checks"]["workers"]["count"] == 0


@pytest.mark.slow
def test_health_is_green_with_a_live_worker(live_worker, user):
    staff = UserFactory(is_staff=True)
    client = APIClient()
    client.force_authenticate(staff)
    project = ProjectFactory(owner=user)
    get_worker_space(user_id=user.pk, project_id=project.id)

    response = client.get(HEALTH)
    body = response.json()

    assert response.status_code == 200, body
    assert body["healthy"] is True and body["checks"]["workers"]["count"] >= 1
    assert body["details"][f"{user.pk}_{project.id}"]["healthy"] is True


# --- the Django admin page ----------------------------------------------------------

ADMIN = "/admin/workspaces/workspace/"


@pytest.fixture
def admin_client(client, staff):
    client.force_login(staff)
    return client


@pytest.mark.django_db
def test_admin_lists_the_registry(admin_client, user):
    project = ProjectFactory(owner=user, name="Moon base")
    AgentFactory(project=project)
    get_worker_space(user_id=user.pk, project_id=project.id)

    page = admin_client.get(ADMIN)

    assert page.status_code == 200
    html = page.content.decode()
    assert f"{user.pk}_{project.id}" in html and "Moon base" in html and "Initialized" in html
    assert admin_client.get("/admin/").content.decode().count(ADMIN) >= 1


@pytest.mark.django_db
def test_admin_page_is_for_staff_only(client, user):
    client.force_login(user)
    assert client.get(ADMIN).status_code == 302  # to the admin login


@pytest.mark.django_db
def test_admin_reset_action(admin_client, user):
    project = ProjectFactory(owner=user)
    AgentFactory(project=project)
    space = get_worker_space(user_id=user.pk, project_id=project.id)

    response = admin_client.post(
        ADMIN, {"action": "reset", "selected": [f"{user.pk}:{project.id.hex}"]}, follow=True
    )

    assert response.status_code == 200 and "Reset 1 workspace" in response.content.decode()
    entry = registry.read(space.redis, user.pk, project.id)
    assert entry.state is State.NOT_INITIALIZED and entry.agent_ids == []


@pytest.mark.django_db
def test_admin_teardown_refuses_a_live_project_and_tears_down_an_orphan(admin_client, user):
    live, orphan = ProjectFactory(owner=user), ProjectFactory(owner=user)
    for project in (live, orphan):
        get_worker_space(user_id=user.pk, project_id=project.id)
    orphan_id = orphan.id
    orphan.delete()  # without the delete service: nothing owed was recorded
    live_keys = keys_under(user.pk, live.id)

    response = admin_client.post(
        ADMIN,
        {
            "action": "teardown",
            "selected": [f"{user.pk}:{live.id.hex}", f"{user.pk}:{orphan_id.hex}"],
        },
        follow=True,
    )

    html = response.content.decode()
    assert "Teardown scheduled for 1 workspace" in html
    assert "the project exists; reset it, or delete the project" in html
    assert keys_under(user.pk, live.id) == live_keys
    assert not WorkspaceTeardown.objects.filter(project_id=live.id).exists()
    row = WorkspaceTeardown.objects.get(project_id=orphan_id)
    assert row.status == WorkspaceTeardown.Status.PENDING and row.user_id == user.pk


@pytest.mark.django_db
def test_admin_post_with_nothing_selected_changes_nothing(admin_client, user):
    project = ProjectFactory(owner=user)
    get_worker_space(user_id=user.pk, project_id=project.id)
    before = keys_under(user.pk, project.id)
    for data in ({"action": "reset"}, {"action": "explode", "selected": "1:" + "0" * 32}, {}):
        response = admin_client.post(ADMIN, data, follow=True)
        assert "Select workspaces and an action." in response.content.decode()
    assert keys_under(user.pk, project.id) == before
    assert admin_client.post(ADMIN, {"action": "reset", "selected": f"9:{uuid.uuid4().hex}"})


@pytest.mark.django_db
def test_health_summarises_and_pages_workspaces_problems_first(staff_api, user):
    projects = sorted((ProjectFactory(owner=user) for _ in range(5)), key=lambda p: p.id.hex)
    for project in projects:
        get_worker_space(user_id=user.pk, project_id=project.id)
    failed = [projects[3], projects[1]]
    for project in failed:  # failed in that order: the oldest failure first
        registry.mark_error(scoped(user.pk, project.id), "RuntimeError: boom")
    keys = [f"{user.pk}_{p.id}" for p in projects]
    expected = [keys[3], keys[1], keys[0], keys[2], keys[4]]

    pages = []
    for offset in range(0, 6, 2):
        response = staff_api.get(HEALTH, {"limit": 2, "offset": offset})
        assert response.status_code == 503
        body = response.json()
        pages.extend(body["details"])
        assert body["limit"] == 2 and body["offset"] == offset
    assert pages == expected  # problems first, then the rest in index order, no repeats

    body = staff_api.get(HEALTH).json()
    assert body["total_spaces"] == 5 and body["healthy_spaces"] == 3
    assert body["states"]["Initialized"] == 3 and body["states"]["Error"] == 2
    assert body["problems"]["initialisation_failed"] == 2
    assert body["problems"]["initialisation_stuck"] == 0
    assert body["unhealthy_spaces"] == expected[:2]
    assert "boom" in body["details"][keys[3]]["problems"][0]


@pytest.mark.django_db
@pytest.mark.parametrize(
    "params",
    [{"limit": 0}, {"limit": 501}, {"limit": "x"}, {"offset": -1}, {"details": "all"}],
)
def test_health_bad_parameters_are_400(staff_api, user, params):
    project = ProjectFactory(owner=user)
    get_worker_space(user_id=user.pk, project_id=project.id)
    before = keys_under(user.pk, project.id)
    response = staff_api.get(HEALTH, params)
    body = response.json()
    assert response.status_code == 400 and body["code"] == "invalid"
    assert set(body) - {"detail", "code"} == set(params)  # the bad parameter is named
    assert keys_under(user.pk, project.id) == before


@pytest.mark.django_db
def test_stats_pages_count_every_state(staff_api, user):
    projects = [ProjectFactory(owner=user) for _ in range(3)]
    for project in projects:
        get_worker_space(user_id=user.pk, project_id=project.id)
    body = staff_api.get(STATS, {"limit": 2}).json()
    assert len(body["spaces"]) == 2 and body["total_spaces"] == 3
    assert body["active_spaces"] == 3 and body["states"]["Initialized"] == 3
    rest = staff_api.get(STATS, {"limit": 2, "offset": 2}).json()
    assert len(rest["spaces"]) == 1 and not set(rest["spaces"]) & set(body["spaces"])
    assert staff_api.get(STATS, {"limit": 1001}).status_code == 400
