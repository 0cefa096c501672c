import pytest
from rest_framework.test import APIClient

from projects.models import Project
from tests.factories import ProjectFactory

pytestmark = pytest.mark.django_db


def test_no_credentials_is_401():
    response = APIClient().get("/my/projects/")
    assert response.status_code == 401


def test_token_endpoint_exchanges_username_and_password(user):
    response = APIClient().post(
        "/auth/token/", {"username": user.username, "password": "pw-123456"}, format="json"
    )
    assert response.status_code == 200
    token = response.json()["token"]
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {token}")
    assert client.get("/my/projects/").status_code == 200


def test_token_endpoint_rejects_a_wrong_password(user):
    response = APIClient().post(
        "/auth/token/", {"username": user.username, "password": "wrong"}, format="json"
    )
    assert response.status_code == 401
    assert response.json()["code"] == "authentication_failed"
    assert response["WWW-Authenticate"]


def test_session_authentication_works_for_the_browsable_api(user):
    client = APIClient()
    client.force_login(user)
    assert client.get("/my/projects/").status_code == 200


def test_create_get_update_delete(api):
    created = api.post("/my/projects/", {"name": "Alpha", "description": "first"}, format="json")
    assert created.status_code == 201, created.content
    body = created.json()
    assert body["name"] == "Alpha" and body["description"] == "first"
    url = f"/my/projects/{body['id']}/"

    assert api.get(url).json()["name"] == "Alpha"
    patched = api.patch(url, {"description": "changed"}, format="json")
    assert patched.status_code == 200
    assert patched.json() == {**api.get(url).json(), "description": "changed"}

    assert api.delete(url).status_code == 204
    assert api.get(url).status_code == 404
    assert not Project.objects.filter(id=body["id"]).exists()


def test_list_shape_and_paging(api, user):
    for i in range(5):
        ProjectFactory(owner=user, name=f"p{i}")
    ProjectFactory()  # someone else's

    body = api.get("/my/projects/", {"limit": 2, "offset": 1}).json()
    assert body["total"] == 5
    assert body["limit"] == 2 and body["offset"] == 1
    assert len(body["projects"]) == 2
    everything = api.get("/my/projects/").json()["projects"]
    assert [p["id"] for p in everything[1:3]] == [p["id"] for p in body["projects"]]


@pytest.mark.parametrize(
    "query, field",
    [
        ({"limit": 0}, "limit"),
        ({"limit": 201}, "limit"),
        ({"offset": -1}, "offset"),
        ({"limit": "x"}, "limit"),
    ],
)
def test_bad_paging_is_400_naming_the_parameter(api, query, field):
    response = api.get("/my/projects/", query)
    assert response.status_code == 400
    assert field in response.json()


@pytest.mark.parametrize(
    "payload, field",
    [
        ({}, "name"),
        ({"name": ""}, "name"),
        ({"name": "x" * 201}, "name"),
        ({"name": "ok", "description": "d" * 2001}, "description"),
        ({"name": "ok", "owner": 5}, "owner"),
        ({"name": ["not", "a", "string"]}, "name"),
    ],
)
def test_invalid_create_is_400_naming_the_field_and_writes_nothing(api, payload, field):
    response = api.post("/my/projects/", payload, format="json")
    assert response.status_code == 400
    assert field in response.json()
    assert Project.objects.count() == 0


def test_invalid_update_changes_nothing(api, project):
    response = api.patch(f"/my/projects/{project.id}/", {"name": ""}, format="json")
    assert response.status_code == 400 and "name" in response.json()
    project.refresh_from_db()
    assert project.name != ""


def test_malformed_json_is_400_and_writes_nothing(api):
    response = api.post("/my/projects/", "{not json", content_type="application/json")
    assert response.status_code == 400
    assert Project.objects.count() == 0
