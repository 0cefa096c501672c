"""Project API keys: shown once, stored hashed, listed, revoked at once; a key reaches
exactly its scopes on exactly its project (the isolation matrix, walked with a key)."""

from __future__ import annotations

import itertools

import pytest

from governance.keys import key_hash
from governance.models import ProjectApiKey
from projects.models import Project
from tests.api.test_isolation import ROUTES, _body, _fill, _snapshot
from tests.governance.conftest import key_client

pytestmark = pytest.mark.django_db


def test_create_shows_the_key_once_and_stores_only_its_hash(api, project, make_key):
    raw, body = make_key(project, ["read", "chat", "read"])
    assert raw.startswith("uws_") and len(raw) > 40
    assert body["prefix"] == raw[:12] and body["scopes"] == ["chat", "read"]
    stored = ProjectApiKey.objects.get(id=body["id"])
    assert stored.key_hash == key_hash(raw)
    assert raw not in str(ProjectApiKey.objects.filter(id=body["id"]).values().get())

    listed = api.get(f"/my/projects/{project.id}/keys/").json()
    assert listed["total"] == 1
    (item,) = listed["keys"]
    assert "key" not in item and item["prefix"] == raw[:12] and item["last_used_at"] is None

    assert key_client(raw).get(f"/my/projects/{project.id}/").status_code == 200
    item = api.get(f"/my/projects/{project.id}/keys/").json()["keys"][0]
    assert item["last_used_at"] is not None


@pytest.mark.parametrize(
    "body, field",
    [
        ({"name": "k", "scopes": []}, "scopes"),
        ({"name": "k", "scopes": ["admin"]}, "scopes"),
        ({"name": "k", "scopes": "read"}, "scopes"),
        ({"name": "", "scopes": ["read"]}, "name"),
        ({"scopes": ["read"]}, "name"),
        ({"name": "k", "scopes": ["read"], "project": "x"}, "project"),
    ],
)
def test_bad_key_input_is_a_400_and_writes_nothing(api, project, body, field):
    response = api.post(f"/my/projects/{project.id}/keys/", body, format="json")
    assert response.status_code == 400, response.content
    assert response.json()["code"] == "invalid" and field in response.json()
    assert not ProjectApiKey.objects.exists()


def test_revoked_key_is_refused_at_once_and_user_token_keeps_working(api, project, make_key):
    raw, body = make_key(project, ["read"])
    client = key_client(raw)
    assert client.get(f"/my/projects/{project.id}/agents/").status_code == 200
    assert api.delete(f"/my/projects/{project.id}/keys/{body['id']}/").status_code == 204
    response = client.get(f"/my/projects/{project.id}/agents/")
    assert response.status_code == 401 and response.json()["code"] == "authentication_failed"
    assert api.get(f"/my/projects/{project.id}/agents/").status_code == 200
    assert api.get(f"/my/projects/{project.id}/keys/").json()["keys"][0]["revoked_at"]


def test_unknown_key_is_a_401(project):
    response = key_client("uws_" + "x" * 43).get(f"/my/projects/{project.id}/")
    assert response.status_code == 401


def test_another_users_key_route_is_404(other_api, project, make_key):
    _, body = make_key(project, ["read"])
    assert other_api.get(f"/my/projects/{project.id}/keys/").status_code == 404
    assert other_api.delete(f"/my/projects/{project.id}/keys/{body['id']}/").status_code == 404
    assert ProjectApiKey.objects.get(id=body["id"]).revoked_at is None


def test_a_key_lists_only_its_project_and_cannot_reach_beyond_it(
    api,
    user,
    world,
    make_key,
):
    mine = Project.objects.get(id=world["mine"]["p"])
    raw, _ = make_key(mine, ["read", "write", "chat"])
    client = key_client(raw)
    projects = client.get("/my/projects/").json()
    assert [p["id"] for p in projects["projects"]] == [str(mine.id)] and projects["total"] == 1
    # Not a way to make projects, keys, or reach operators' pages (even as a staff owner).
    assert client.post("/my/projects/", {"name": "x"}, format="json").status_code == 403
    assert client.get(f"/my/projects/{mine.id}/keys/").status_code == 403
    assert (
        client.post(
            f"/my/projects/{mine.id}/keys/", {"name": "k", "scopes": ["read"]}, format="json"
        ).status_code
        == 403
    )
    user.is_staff = True
    user.save(update_fields=["is_staff"])
    assert client.get("/admin/workspaces/stats").status_code == 403
    assert api.get("/admin/workspaces/stats").status_code == 200
    assert Project.objects.filter(owner=user).count() == 2


# The scope each (route, method) needs; routes not listed here are key management.
def _scope(template: str, method: str) -> str | None:
    if template.endswith("/keys/") or "/keys/{k}/" in template:
        return None  # closed to every key, whatever its scopes
    if template.endswith("/provider/") and method == "put" or template.endswith("/audit/"):
        return None
    if template == "/my/projects/{p}/" and method == "delete":
        return None  # deleting the project takes the owner's own credentials
    if template.endswith("/retention/") and method == "put":
        return None  # shortening retention deletes data: as a delete
    if template.endswith("/exports/") and method == "post":
        return None  # an archive holds everything: the owner's own credentials
    if method == "get":
        return "read"
    if template.endswith(("/messages/", "/cancel/", "/regenerate/", "/approve/", "/reject/")):
        return "chat"
    return "write"


def test_isolation_matrix_with_a_key(world, make_key, redis_client):
    """Every route and method: other projects (another user's, or the same owner's
    second one) are 404 whatever the scope; on its own project, a key without the
    needed scope is a 403 and one with it gets through."""
    mine = Project.objects.get(id=world["mine"]["p"])
    keys = {scope: make_key(mine, [scope], name=scope)[0] for scope in ("read", "write", "chat")}
    full = make_key(mine, ["read", "write", "chat"], name="all")[0]
    before = _snapshot()
    checked = 0
    for (label, ids), (template, methods) in itertools.product(
        [("their project", world["theirs"]), ("my second project", world["second"])], ROUTES
    ):
        for method, raw in itertools.product(methods, [*keys.values(), full]):
            url = _fill(template, ids)
            response = getattr(key_client(raw), method)(url, _body(template, ids), format="json")
            assert response.status_code == 404, (label, method, url, response.content)
            checked += 1
    assert _snapshot() == before, "a key changed another project"

    # Its own project: reads need `read`, changes `write`, messages and cancel `chat`.
    # The deleting routes come last, so what they remove is not needed after them.
    own = world["mine"]
    for template, methods in sorted(ROUTES, key=lambda r: "delete" in r[1]):
        for method in sorted(methods, key=lambda m: m == "delete"):
            if template.endswith("/events/"):
                continue  # a stream that never ends: tests/runtime/test_sse.py covers it
            if _scope(template, method) is None:  # closed to every key, whatever its scopes
                for raw in [*keys.values(), full]:
                    response = getattr(key_client(raw), method)(
                        _fill(template, own), _body(template, own), format="json"
                    )
                    assert response.status_code == 403, (method, template)
                    checked += 1
                continue
            need = _scope(template, method)
            url = _fill(template, own)
            for scope, raw in keys.items():
                if scope == need:
                    continue
                response = getattr(key_client(raw), method)(
                    url, _body(template, own), format="json"
                )
                assert response.status_code == 403, (scope, method, url, response.content)
                assert need in response.json()["detail"]
                checked += 1
            if method == "delete":
                continue  # allowed deletes are the API tests' business; not needed here
            response = getattr(key_client(keys[need]), method)(
                url, _body(template, own), format="json"
            )
            if template.endswith("/jobs/{j}/"):
                # The job id is made up: its 404 is about the job, not the project.
                assert response.json()["detail"] == "No such context job.", url
            elif "/exports/{j}/" in template or "{doc}" in template:
                # Made-up export and document ids too: a 404 naming them, not the project.
                assert response.status_code == 404, (need, method, url)
                assert "project" not in response.json()["detail"].lower(), url
            else:
                assert response.status_code not in (401, 403, 404), (need, method, url)
            checked += 1
    assert checked > 200
