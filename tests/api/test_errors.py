"""Every error the API answers is JSON in one shape, whoever answers it (a DRF view, a
plain view, Django's URL resolver, its CSRF check), under DEBUG as in production; and
paths work with or without their trailing slash."""

from __future__ import annotations

import pytest
from django.test import Client
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

import projects.apis
from projects.models import Project
from tests.factories import ChatSessionFactory, ProjectFactory, UserFactory

pytestmark = pytest.mark.django_db


@pytest.fixture(params=[False, True], ids=["production", "debug"])
def debug(request, settings):
    settings.DEBUG = request.param
    return request.param


def assert_error(response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.content[:300]
    assert response["Content-Type"].startswith("application/json"), response["Content-Type"]
    body = response.json()
    assert isinstance(body["detail"], str) and body["detail"]
    assert isinstance(body["code"], str) and body["code"]
    if code:
        assert body["code"] == code, body
    return body


@pytest.mark.parametrize(
    "path",
    [
        "/my/projects/not-a-uuid/",
        "/my/projects/null%2Cnull/agents/",
        "/my/projects/{p}/agents/123/",
        "/my/projects/{p}/chat/x/messages/",
        "/my/projects/{p}/chat/{s}/events/x/",
        "/my/projects/{p}/nothing-here/",
        "/auth/nothing/",
    ],
)
def test_malformed_ids_and_unknown_paths_are_json_404(api, session, debug, path):
    url = path.format(p=session.project_id, s=session.id)
    for method in ("get", "post", "delete"):
        assert_error(getattr(api, method)(url), 404, "not_found")


def test_the_admin_keeps_its_html_pages(debug):
    response = Client().get("/admin/no-such-page/")
    assert response.status_code in (302, 404)
    assert not response["Content-Type"].startswith("application/json")


def test_unsupported_methods_are_json_405_with_allow(api, session, debug):
    base = f"/my/projects/{session.project_id}"
    for method, url in [
        ("put", f"{base}/"),
        ("delete", "/my/projects/"),
        ("post", f"{base}/chat/{session.id}/"),
        ("post", f"{base}/chat/{session.id}/events/"),  # the plain SSE view: not a CSRF 403
        ("delete", f"{base}/chat/{session.id}/events/"),
    ]:
        body = assert_error(getattr(api, method)(url), 405, "method_not_allowed")
        assert body["detail"]


def test_the_event_stream_answers_405_to_a_browser_session_post_too(user, session, debug):
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    url = f"/my/projects/{session.project_id}/chat/{session.id}/events/"
    response = client.post(url)
    assert_error(response, 405)
    assert response["Allow"] == "GET"


def test_a_csrf_failure_on_the_api_is_json_403(user, debug):
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    response = client.post("/my/projects/", {"name": "x"}, content_type="application/json")
    body = assert_error(response, 403, "permission_denied")
    assert "CSRF" in body["detail"]
    assert not Project.objects.exists()


def test_unauthenticated_is_json_401_with_a_challenge(debug):
    response = APIClient().get("/my/projects/")
    assert_error(response, 401, "not_authenticated")
    assert response["WWW-Authenticate"]


def test_wrong_media_type_is_json_415(api, debug):
    response = api.post("/my/projects/", "name=x", content_type="application/x-www-form-urlencoded")
    assert_error(response, 415, "unsupported_media_type")


def test_malformed_json_is_a_parse_error(api, debug):
    assert_error(
        api.post("/my/projects/", "{", content_type="application/json"), 400, "parse_error"
    )


def test_a_server_error_is_json_500_without_details(api, monkeypatch, debug):
    def explode(**kwargs):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(projects.apis, "project_list", explode)
    api.raise_request_exception = False
    response = api.get("/my/projects/")
    body = assert_error(response, 500, "server_error")
    assert "secret" not in response.content.decode()
    assert body["detail"] == "Internal Server Error."


@pytest.mark.parametrize("path", ["/admin/workspaces/health", "/admin/workspaces/health/"])
def test_operators_paths_with_or_without_a_slash_answer_token_clients(path, debug):
    staff = UserFactory(is_staff=True)
    client = APIClient()
    client.force_authenticate(staff)
    response = client.get(path)
    assert response.status_code in (200, 503)
    assert "checks" in response.json()
    assert_error(APIClient().get(path), 401)


def test_delete_without_the_trailing_slash_deletes(api, user, debug):
    project = ProjectFactory(owner=user)
    response = api.delete(f"/my/projects/{project.id}")
    assert response.status_code == 204
    assert not Project.objects.filter(id=project.id).exists()


def test_other_api_paths_without_the_slash_are_served_too(api, user, debug):
    project = ProjectFactory(owner=user)
    created = api.post(f"/my/projects/{project.id}/agents", {"name": "a"}, format="json")
    assert created.status_code == 201
    assert api.get("/my/projects").json()["total"] == 1
    assert_error(api.get(f"/my/projects/{project.id}/nothing"), 404)


def test_bearer_is_accepted_as_well_as_token(user):
    key = Token.objects.create(user=user).key
    for scheme in ("Token", "Bearer", "bearer"):
        response = APIClient().get("/my/projects/", HTTP_AUTHORIZATION=f"{scheme} {key}")
        assert response.status_code == 200, scheme
    assert_error(APIClient().get("/my/projects/", HTTP_AUTHORIZATION="Bearer nope"), 401)
    assert_error(APIClient().get("/my/projects/", HTTP_AUTHORIZATION="Bearer a b"), 401)


def test_another_users_session_is_a_404_in_the_same_shape(api, other_user):
    theirs = ChatSessionFactory(agent__project__owner=other_user)
    body = assert_error(api.get(f"/my/projects/{theirs.project_id}/chat/{theirs.id}/"), 404)
    assert body["detail"] == "No such project."


def test_the_root_page_links_api_docs_admin_and_flower(settings):
    page = Client().get("/").content.decode()
    for href in ("/my/projects/", "/api/docs/", "/api/redoc/", "/admin/", settings.FLOWER_URL):
        assert f'href="{href}"' in page, href
