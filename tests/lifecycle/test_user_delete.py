"""A user's data goes with the user: after a delete, a whole-store audit (every table,
every Redis key, every vector point, every file of the embedded store) finds nothing of
theirs beyond the anonymised audit trail, while another user's data is untouched."""

from __future__ import annotations

import os
import uuid

import pytest
from django.apps import apps
from django.contrib.auth import get_user_model
from django.contrib.sessions.models import Session
from django.db import models
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from agents.models import Agent
from context.vectorstore import TenantScope, get_vector_store
from governance.models import AuditEvent, Quota, UsageDaily
from lifecycle.models import AccountErasure
from tests.runtime.conftest import context_count, wait_for_event
from tests.workers import wait_until
from workspaces.models import WorkspaceTeardown

pytestmark = pytest.mark.slow

NAME = "erase-me-zq"
# What may keep the deleted user's project ids: the anonymised audit trail, anonymised
# daily usage totals (no user id), and the records that each project's teardown was done
# (their owner erased).
ANONYMISED = {AuditEvent, UsageDaily, WorkspaceTeardown}


def client_of(user) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.get_or_create(user=user)[0].key}")
    return client


def populate(api: APIClient, redis_client, name: str) -> dict:
    """A project with an agent, a tool, a secret, an API key, context, a chat answered
    by a real worker; returns what was made."""
    project = api.post("/my/projects/", {"name": f"{name}'s project"}, format="json").json()
    base = f"/my/projects/{project['id']}/"
    agent = api.post(f"{base}agents/", {"name": "helper"}, format="json").json()
    api.post(f"{base}agents/{agent['id']}/tools/", {"kind": "builtin", "name": "add_context"},
             format="json")  # fmt: skip
    assert api.post(f"{base}secrets/", {"name": "TOKEN", "value": "s3cr3t-value"},
                    format="json").status_code == 201  # fmt: skip
    assert api.post(f"{base}keys/", {"name": "ci", "scopes": ["read"]},
                    format="json").status_code == 201  # fmt: skip
    job = api.post(f"{base}agents/{agent['id']}/context/", {"documents": [f"{name} likes tea."]},
                   format="json").json()  # fmt: skip
    wait_until(
        lambda: api.get(f"{base}agents/{agent['id']}/context/jobs/{job['job_id']}/").json()[
            "status"
        ] == "done",
        what="context stored",
    )  # fmt: skip
    stored = context_count(Agent.objects.select_related("project").get(id=agent["id"]))
    session = api.post(f"{base}chat/", {"agent_id": agent["id"]}, format="json").json()
    posted = api.post(f"{base}chat/{session['id']}/messages/", {"content": "What do I like?"},
                      format="json").json()  # fmt: skip

    class P:  # the project as the helpers want it
        id = uuid.UUID(project["id"])

    P.owner_id = get_user_model().objects.get(username=name).pk
    kind, data = wait_for_event(redis_client, P, session["id"],
                                types={"message.completed", "message.error"},
                                message_id=posted["assistant_message_id"])  # fmt: skip
    assert kind == "message.completed", data
    # The run remembers the exchange after its answer's event: the account is deleted
    # once that write is in, not while it is in flight (a write that races a deletion is
    # taken back by its writer once it sees the tombstone, which can be just after the
    # deletion ended: this test checks what a finished deletion leaves).
    wait_until(
        lambda: context_count(Agent.objects.select_related("project").get(id=agent["id"])) > stored,
        what="the exchange remembered",
    )
    return {"project_id": uuid.UUID(project["id"]), "agent_id": agent["id"]}


def rows_of(user_id: int, project_ids: set[uuid.UUID]) -> dict[str, int]:
    """Every table: rows that point at the user (a key to it, or a user id field) or name
    one of their projects (a key to it, or a project id field), outside ANONYMISED."""
    found: dict[str, int] = {}
    User = get_user_model()
    for model in apps.get_models():
        if model in ANONYMISED or not model._meta.managed:
            continue
        for field in model._meta.concrete_fields:
            lookup = None
            related = getattr(field, "related_model", None)
            if related is User or (model is User and field.primary_key):
                lookup = {field.attname: user_id}
            elif field.name in ("user_id", "owner_id") and isinstance(field, models.IntegerField):
                lookup = {field.name: user_id}
            elif related is not None and related._meta.label == "projects.Project":
                lookup = {f"{field.attname}__in": project_ids}
            elif model._meta.label == "projects.Project" and field.primary_key:
                lookup = {"pk__in": project_ids}
            elif field.name == "project_id" and isinstance(field, models.UUIDField):
                lookup = {"project_id__in": project_ids}
            if lookup is None:
                continue
            count = model._default_manager.filter(**lookup).count()
            if count:
                found[f"{model._meta.label}.{field.name}"] = count
        for field in model._meta.concrete_fields:
            if not isinstance(field, models.CharField | models.TextField):
                continue
            count = model._default_manager.filter(**{f"{field.name}__contains": NAME}).count()
            if count:
                found[f"{model._meta.label}.{field.name} ~ name"] = count
    return found


# The bus's deletion markers, which every project delete leaves and which expire on
# their own: a deleted project's tombstone (no stray task of it may run, for
# AGENTBUS_TOMBSTONE_SECONDS) and its queue's entry among the retired ones (2x the
# broker's visibility timeout). They hold the project's random id, nothing of the user.
BUS_MARKERS = ("uws:bus:tombstone:", "uws:bus:retired")


def redis_of(redis_client, user_id: int, project_ids: set[uuid.UUID]) -> list[str]:
    """Every Redis key, and every member of every set, sorted set, hash and list, that
    names the user's workspace prefix or one of their projects (but BUS_MARKERS)."""
    marks = {f"uws:{user_id}:", f"gov:u:{user_id}:"}
    for project_id in project_ids:
        marks |= {project_id.hex, str(project_id)}
    hits = []
    for raw in redis_client.scan_iter(count=1000):
        key = raw.decode() if isinstance(raw, bytes) else raw
        if key.startswith(BUS_MARKERS):
            continue
        values = [key]
        kind = redis_client.type(raw)
        kind = kind.decode() if isinstance(kind, bytes) else kind
        if kind == "set":
            values += redis_client.smembers(raw)
        elif kind == "zset":
            values += redis_client.zrange(raw, 0, -1)
        elif kind == "hash":
            values += redis_client.hkeys(raw)
        elif kind == "list":
            values += redis_client.lrange(raw, 0, -1)
        for value in values:
            text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
            if any(mark in text for mark in marks):
                hits.append(f"{key}: {text[:80]}")
    return hits


def vectors_of(user_id: int, project_ids: set[uuid.UUID]) -> list[str]:
    store = get_vector_store()
    hits = []
    for collection, scopes in store.contexts().items():
        for scope in scopes:
            if scope.user_id == user_id or uuid.UUID(str(scope.project_id)) in project_ids:
                hits.append(f"{collection}: {scope}")
    for project_id in project_ids:
        count = store.count(TenantScope.project(user_id=user_id, project_id=project_id))
        if count:
            hits.append(f"{count} points of project {project_id}")
    return hits


def files_of(root: str, user_id: int, project_ids: set[uuid.UUID]) -> list[str]:
    """Files and folders named after the user's projects, and files whose bytes hold
    their name or a project id (deleted points still on disk, say)."""
    marks = {f"user_{user_id}_"} | {p.hex for p in project_ids} | {str(p) for p in project_ids}
    found = []
    for folder, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            if any(mark in name for mark in marks):
                found.append(os.path.join(folder, name))
        for name in files:
            with open(os.path.join(folder, name), "rb") as handle:
                data = handle.read()
            if any(mark.encode() in data for mark in [*marks, NAME]):
                found.append(f"{os.path.join(folder, name)} (content)")
    return found


def test_deleting_a_user_leaves_nothing_of_theirs_but_the_anonymised_audit(
    live_worker, redis_client, settings, qdrant_path, transactional_db
):
    settings.ACCOUNT_SELF_DELETE = True
    User = get_user_model()
    gone = User.objects.create_user(NAME, password="pw-123456")
    kept = User.objects.create_user("stays-here", password="pw-123456")
    api, other = client_of(gone), client_of(kept)
    mine = [populate(api, redis_client, NAME), populate(api, redis_client, NAME)]
    theirs = populate(other, redis_client, "stays-here")
    Quota.objects.create(user=gone, tokens_per_day=10**9)
    browser = APIClient()
    assert browser.login(username=NAME, password="pw-123456")
    assert Session.objects.count() == 1
    project_ids = {m["project_id"] for m in mine}
    audited = AuditEvent.objects.filter(user_id=gone.pk).count()
    assert audited >= 10
    user_id = gone.pk

    # Confirmation is required; a wrong one deletes nothing.
    assert api.delete("/my/account/", {"confirm": "someone"}, format="json").status_code == 400
    assert api.delete("/my/account/", {}, format="json").status_code == 400
    assert User.objects.filter(pk=user_id).exists()
    response = api.delete("/my/account/", {"confirm": NAME}, format="json")
    assert response.status_code == 204, response.content

    wait_until(lambda: not AccountErasure.objects.exists(), timeout=60, what="erasure done")
    assert not User.objects.filter(pk=user_id).exists()
    assert rows_of(user_id, project_ids) == {}
    assert redis_of(redis_client, user_id, project_ids) == []
    assert vectors_of(user_id, project_ids) == []
    assert files_of(qdrant_path, user_id, project_ids) == []
    assert Session.objects.count() == 0
    # The audit trail stays, anonymised; usage stays as totals with no user.
    trail = AuditEvent.objects.filter(project_id__in=project_ids)
    assert trail.count() >= audited - 2  # (the account's own delete is not project-scoped)
    assert set(trail.values_list("user_id", flat=True)) == {None}
    assert {u.startswith("deleted-user-") for u in trail.values_list("username", flat=True)} == {
        True
    }
    assert set(trail.values_list("ip_address", flat=True)) == {None}
    assert not AuditEvent.objects.filter(username=NAME).exists()
    totals = UsageDaily.objects.filter(project_id__in=project_ids)
    assert totals.exists()  # (at least the context ingests embedded)
    assert set(totals.values_list("user_id", flat=True)) <= {None}
    teardowns = WorkspaceTeardown.objects.filter(project_id__in=project_ids)
    assert set(teardowns.values_list("user_id", flat=True)) == {0}

    # The other user's project is whole and answers.
    assert other.get(f"/my/projects/{theirs['project_id']}/").status_code == 200
    agent = get_user_model().objects.get(username="stays-here").projects.get().agents.get()
    assert context_count(agent) >= 1
    assert AuditEvent.objects.filter(username="stays-here").exists()


def test_self_service_deletion_is_off_unless_the_deployment_allows_it(api, user, settings):
    settings.ACCOUNT_SELF_DELETE = False
    response = api.delete("/my/account/", {"confirm": user.username}, format="json")
    assert response.status_code == 403 and response.json()["code"] == "permission_denied"
    assert get_user_model().objects.filter(pk=user.pk).exists()


def test_a_project_key_cannot_delete_its_owner(api, user, project, settings):
    settings.ACCOUNT_SELF_DELETE = True
    key = api.post(f"/my/projects/{project.id}/keys/", {"name": "k", "scopes": ["read", "write"]},
                   format="json").json()["key"]  # fmt: skip
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    response = client.delete("/my/account/", {"confirm": user.username}, format="json")
    assert response.status_code == 403
    assert get_user_model().objects.filter(pk=user.pk).exists()
