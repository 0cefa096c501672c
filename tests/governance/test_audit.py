"""The audit log: every mutation through the API or the admin recorded once (who,
credential, what, when, from where), readable by the owner, append-only, purged after
the retention time."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import DatabaseError, connection, transaction
from django.test import Client
from django.utils import timezone

from governance.audit import audit_purge
from governance.models import AuditEvent, ProjectApiKey, Quota
from tests.factories import UserFactory
from tests.governance.conftest import key_client

pytestmark = pytest.mark.django_db


def audit(api, project_id):
    response = api.get(f"/my/projects/{project_id}/audit/", {"limit": 200})
    assert response.status_code == 200, response.content
    return response.json()


def test_each_api_mutation_is_recorded_once(api, user, other_api):
    created = api.post("/my/projects/", {"name": "audited"}, format="json").json()
    p = created["id"]
    base = f"/my/projects/{p}"
    api.patch(f"{base}/", {"description": "d"}, format="json")
    agent = api.post(f"{base}/agents/", {"name": "a", "model": "offline"}, format="json").json()
    key = api.post(f"{base}/keys/", {"name": "k", "scopes": ["chat"]}, format="json").json()
    session = api.post(f"{base}/chat/", {"agent_id": agent["id"]}, format="json").json()
    sent = key_client(key["key"]).post(
        f"{base}/chat/{session['id']}/messages/", {"content": "hi"}, format="json"
    )
    assert sent.status_code == 202
    assert api.delete(f"{base}/keys/{key['id']}/").status_code == 204
    # Not mutations, or not done: none is recorded.
    api.get(f"{base}/agents/")
    assert api.post(f"{base}/agents/", {"name": ""}, format="json").status_code == 400
    assert other_api.patch(f"{base}/", {"name": "x"}, format="json").status_code == 404

    body = audit(api, p)
    events = list(reversed(body["events"]))
    assert body["total"] == 7
    assert [e["action"] for e in events] == [
        "POST /my/projects/",
        "PATCH /my/projects/<uuid:project_id>/",
        "POST /my/projects/<uuid:project_id>/agents/",
        "POST /my/projects/<uuid:project_id>/keys/",
        "POST /my/projects/<uuid:project_id>/chat/",
        "POST /my/projects/<uuid:project_id>/chat/<uuid:session_id>/messages/",
        "DELETE /my/projects/<uuid:project_id>/keys/<uuid:key_id>/",
    ]
    assert {e["username"] for e in events} == {user.username}
    assert [e["credential"] for e in events].count("key") == 1
    by_key = next(e for e in events if e["credential"] == "key")
    assert by_key["key_prefix"] == key["prefix"] and by_key["status_code"] == 202
    assert {e["credential"] for e in events if e is not by_key} == {"token"}
    assert {e["ip_address"] for e in events} == {"127.0.0.1"}
    assert events[-1]["path"] == f"{base}/keys/{key['id']}/"


def test_admin_mutations_are_recorded_once(user, project):
    staff = UserFactory(is_staff=True, is_superuser=True)
    admin = Client()
    admin.force_login(staff)
    form = {"project": str(project.id), "user": "", "tokens_per_day": "100",
            "tokens_per_month": "", "messages_per_minute": "", "concurrent_runs": ""}  # fmt: skip
    response = admin.post("/admin/governance/quota/add/", form)
    assert response.status_code == 302, response.content.decode()[:2000]
    assert Quota.objects.get(project=project).tokens_per_day == 100
    key = ProjectApiKey.objects.create(project=project, name="k", prefix="uws_x", key_hash="h")
    response = admin.post(
        "/admin/governance/projectapikey/",
        {"action": "revoke", "_selected_action": [str(key.id)]},
    )
    assert response.status_code == 302
    events = list(AuditEvent.objects.order_by("id"))
    assert [(e.credential, e.action, e.username) for e in events] == [
        ("admin", "add governance.quota", staff.username),
        ("admin", "change governance.projectapikey", staff.username),
    ]
    assert {e.project_id for e in events} == {project.id}
    assert events[0].ip_address == "127.0.0.1" and events[0].path == "/admin/governance/quota/add/"


def test_only_the_owner_reads_it(api, other_api, project, make_key):
    api.patch(f"/my/projects/{project.id}/", {"name": "renamed"}, format="json")
    assert audit(api, project.id)["total"] == 1
    assert other_api.get(f"/my/projects/{project.id}/audit/").status_code == 404
    raw, _ = make_key(project, ["read", "write", "chat"])
    assert key_client(raw).get(f"/my/projects/{project.id}/audit/").status_code == 403


@pytest.mark.skipif(connection.vendor != "postgresql", reason="the trigger is PostgreSQL's")
def test_records_cannot_be_changed(api, project):
    api.patch(f"/my/projects/{project.id}/", {"name": "renamed"}, format="json")
    with pytest.raises(DatabaseError, match="append-only"), transaction.atomic():
        AuditEvent.objects.update(username="someone else")
    assert AuditEvent.objects.get().username == project.owner.username


def test_records_older_than_the_retention_are_purged(project, settings):
    settings.AUDIT_RETENTION_DAYS = 30
    for age in (31, 400, 29):
        AuditEvent.objects.create(
            created_at=timezone.now() - timedelta(days=age),
            project_id=project.id,
            credential="token",
            method="PATCH",
            path=f"/{age}/",
            action="PATCH",
        )
    assert audit_purge(batch=1) == 2
    assert list(AuditEvent.objects.values_list("path", flat=True)) == ["/29/"]


def test_a_user_with_audit_records_can_be_deleted_and_the_records_stay_anonymised(api, user):
    """Deleting the user keeps their records, anonymised: no user id, no name (a
    pseudonym, the same on all of them), no address; on PostgreSQL the append-only
    trigger lets exactly that update through and still refuses any other."""
    created = api.post("/my/projects/", {"name": "to go"}, format="json").json()
    api.patch(f"/my/projects/{created['id']}/", {"description": "d"}, format="json")
    recorded = AuditEvent.objects.filter(user_id=user.id).count()
    assert recorded >= 2
    operator = UserFactory(is_staff=True, is_superuser=True)
    admin = Client()
    admin.force_login(operator)
    response = admin.post(f"/admin/auth/user/{user.id}/delete/", {"post": "yes"})
    assert response.status_code == 302, response.content[:500]
    assert not type(user).objects.filter(id=user.id).exists()
    assert not AuditEvent.objects.filter(username=user.username).exists()
    kept = AuditEvent.objects.filter(project_id=created["id"])
    assert kept.count() == recorded
    assert len(set(kept.values_list("username", flat=True))) == 1
    assert kept.first().username.startswith("deleted-user-")
    assert set(kept.values_list("user_id", "ip_address")) == {(None, None)}
    if connection.vendor == "postgresql":  # history still cannot be rewritten
        with pytest.raises(DatabaseError, match="append-only"), transaction.atomic():
            kept.update(username="someone else")
        with pytest.raises(DatabaseError, match="append-only"), transaction.atomic():
            kept.update(username="deleted-user-x", path="/elsewhere/")
