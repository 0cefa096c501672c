"""Flow rules of a project: operators set them (operators' API, admin), owners read them,
the bus applies them (agentbus.flow)."""

from __future__ import annotations

import uuid

import pytest
from rest_framework.test import APIClient

from agentbus.flow import flow_status
from agentbus.keys import FLOW_RULES_KEY
from agentbus.queues import project_queue
from projects.models import Project
from tests.factories import UserFactory


@pytest.fixture
def operator(db) -> APIClient:
    client = APIClient()
    client.force_authenticate(UserFactory(is_staff=True))
    return client


def _url(project_id) -> str:
    return f"/admin/workspaces/flow/projects/{project_id}"


@pytest.mark.django_db(transaction=True)
def test_an_operator_sets_weight_and_cap_and_the_bus_applies_them(operator, project, redis_client):
    response = operator.patch(_url(project.id), {"weight": 3, "max_in_flight": 5}, format="json")
    assert response.status_code == 200, response.content
    body = response.json()
    assert (body["weight"], body["max_in_flight"], body["applied"]) == (3, 5, True)
    assert body["bus"]["weight"] == 3 and body["bus"]["max_in_flight"] == 5
    assert redis_client.hget(FLOW_RULES_KEY, project_queue(project.id)) == "3 5"
    project.refresh_from_db()
    assert (project.flow_weight, project.flow_max_in_flight) == (3, 5)

    # Back to the defaults: nothing left for the take to read.
    response = operator.patch(_url(project.id), {"weight": None, "max_in_flight": 0}, format="json")
    assert response.status_code == 200
    assert redis_client.hget(FLOW_RULES_KEY, project_queue(project.id)) is None
    assert flow_status([project.id])[str(project.id)].weight == 1


@pytest.mark.django_db(transaction=True)
def test_with_flow_control_off_rules_are_stored_and_said_not_applied(
    operator, project, redis_client, settings, client
):
    settings.AGENTBUS_FLOW_CONTROL = False
    response = operator.patch(_url(project.id), {"weight": 3, "max_in_flight": 5}, format="json")
    assert response.status_code == 200, response.content
    body = response.json()
    assert (body["weight"], body["max_in_flight"], body["applied"]) == (3, 5, False)
    assert redis_client.hget(FLOW_RULES_KEY, project_queue(project.id)) == "3 5"
    client.force_login(UserFactory(is_staff=True, is_superuser=True))
    page = client.get(f"/admin/projects/project/{project.id}/change/")
    assert b"rules applied: no (AGENTBUS_FLOW_CONTROL off)" in page.content
    settings.AGENTBUS_FLOW_CONTROL = True
    assert operator.get(_url(project.id)).json()["applied"] is True


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    "payload",
    [
        {"weight": 0},
        {"weight": 1001},
        {"weight": "heavy"},
        {"max_in_flight": -1},
        {"max_in_flight": 10_001},
        {"priority": 1},
    ],
)
def test_bad_rules_are_a_400_and_write_nothing(operator, project, redis_client, payload):
    response = operator.patch(_url(project.id), payload, format="json")
    assert response.status_code == 400, response.content
    project.refresh_from_db()
    assert (project.flow_weight, project.flow_max_in_flight) == (None, 0)
    assert redis_client.hget(FLOW_RULES_KEY, project_queue(project.id)) is None


@pytest.mark.django_db
def test_no_such_project_is_a_404(operator):
    assert operator.get(_url(uuid.uuid4())).status_code == 404
    for path in ("null,null", "not-a-uuid/", "1/2"):  # never the admin's catch-all
        url = f"/admin/workspaces/flow/projects/{path}"
        assert operator.patch(url, {"weight": 2}, format="json").status_code == 404
        assert operator.get(url).status_code == 404
    assert operator.patch(_url(uuid.uuid4()), {"weight": 2}, format="json").status_code == 404


@pytest.mark.django_db
def test_owners_read_their_rules_and_cannot_set_them(api, other_api, project, redis_client):
    Project.objects.filter(id=project.id).update(flow_weight=4, flow_max_in_flight=2)
    body = api.get(f"/my/projects/{project.id}/").json()
    assert (body["weight"], body["max_in_flight"]) == (4, 2)
    # Not the owner's to change: an unknown field for them, a 400, nothing written.
    response = api.patch(f"/my/projects/{project.id}/", {"weight": 100}, format="json")
    assert response.status_code == 400
    project.refresh_from_db()
    assert project.flow_weight == 4
    # The operators' route is not theirs, and another user's project stays a 404.
    assert api.patch(_url(project.id), {"weight": 100}, format="json").status_code == 403
    assert other_api.get(f"/my/projects/{project.id}/").status_code == 404
    assert redis_client.hget(FLOW_RULES_KEY, project_queue(project.id)) is None


@pytest.mark.django_db(transaction=True)
def test_the_admin_change_form_applies_the_rules(project, redis_client, client):
    admin = UserFactory(is_staff=True, is_superuser=True)
    client.force_login(admin)
    url = f"/admin/projects/project/{project.id}/change/"
    page = client.get(url)
    assert page.status_code == 200 and b"weight applied: 1" in page.content
    response = client.post(
        url,
        {"name": project.name, "description": "", "flow_weight": "2", "flow_max_in_flight": "7"},
    )
    assert response.status_code == 302, response.content[:2000]
    assert redis_client.hget(FLOW_RULES_KEY, project_queue(project.id)) == "2 7"


@pytest.mark.django_db
def test_the_metrics_show_the_flow(operator, project):
    body = operator.get("/admin/metrics").content.decode()
    assert "uws_flow_served" in body and "uws_flow_cap_waits" in body
    assert "uws_flow_limit_hits" in body or "# TYPE uws_flow_limit_hits" in body
