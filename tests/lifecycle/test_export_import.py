"""Export and import: a project goes out as one archive and comes back under another
owner with new ids and nothing lost (but secrets' values, which never travel); its
context is embedded again; nothing of another tenant is reachable."""

from __future__ import annotations

import io
import json
import zipfile
from datetime import timedelta

import pytest
from django.utils import timezone
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from agents.models import Agent
from chat.models import Message, Run
from governance.models import UsageDaily
from lifecycle.exports import exports_dir
from lifecycle.models import ArchiveJob
from tests.runtime.conftest import context_count, wait_for_event
from tests.workers import wait_until

pytestmark = pytest.mark.slow


def finished(api, url):
    def done():
        body = api.get(url).json()
        assert "status" in body, (url, body)
        return body if body["status"] in ("done", "error") else None

    body = wait_until(done, timeout=120, what=url)
    assert body["status"] == "done", body
    return body


def canonical(files: dict[str, list[dict]]) -> dict[str, list]:
    """An archive's records with every id replaced by the position of what it names, so
    two archives of equal projects compare equal whatever their ids."""
    refs: dict[str, dict[str, int]] = {}
    for section, key in (("agents", "id"), ("sessions", "id"), ("messages", "id"), ("runs", "id")):
        refs[section] = {str(r[key]): i for i, r in enumerate(files.get(f"{section}.jsonl", []))}
    links = {"agent_id": "agents", "target_agent_id": "agents", "session_id": "sessions",
             "message_id": "messages", "parent_id": "runs"}  # fmt: skip

    def clean(value, section):
        if isinstance(value, dict):
            out = {}
            for k, v in value.items():
                if k == "id":
                    continue
                if k in links and v is not None:
                    out[k] = refs[links[k]].get(str(v), "foreign")
                else:
                    out[k] = clean(v, section)
            return out
        if isinstance(value, list):
            return [clean(v, section) for v in value]
        return value

    result = {}
    for name, rows in files.items():
        if name.startswith("context/"):
            agent = refs["agents"][name[8:-6]]
            result[f"context/{agent}"] = rows
        else:
            result[name] = [clean(r, name) for r in rows]
    # Usage totals are keyed by (day, agent, model): their order follows the agents' ids.
    result["usage.jsonl"] = sorted(result.get("usage.jsonl", []), key=json.dumps)
    return result


def archive_of(api, project_id, job_id) -> dict[str, list[dict]]:
    response = api.get(f"/my/projects/{project_id}/exports/{job_id}/archive/")
    assert response.status_code == 200, response.content
    assert response["Content-Type"] == "application/octet-stream"
    data = b"".join(response.streaming_content)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return {
            n: [json.loads(line) for line in archive.read(n).splitlines()]
            for n in archive.namelist()
            if n.endswith(".jsonl")
        }


def test_round_trip_keeps_everything_but_ids_and_secret_values(
    live_worker, api, user, other_api, redis_client, transactional_db
):
    made = api.post("/my/projects/", {"name": "exported"}, format="json").json()
    base = f"/my/projects/{made['id']}/"
    first = api.post(f"{base}agents/", {"name": "first", "system_prompt": "v1"},
                     format="json").json()  # fmt: skip
    second = api.post(f"{base}agents/", {"name": "second"}, format="json").json()
    api.patch(f"{base}agents/{first['id']}/", {"system_prompt": "v2"}, format="json")
    tool = {"kind": "http", "name": "lookup", "method": "GET", "description": "d",
            "url_template": "https://example.com/{q}",
            "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
            "headers": {"Authorization": "Bearer {{secret:API_TOKEN}}"}}  # fmt: skip
    assert api.post(f"{base}agents/{first['id']}/tools/", tool, format="json").status_code == 201
    calls = {"kind": "agent", "name": "ask_second", "target_agent_id": second["id"]}
    assert api.post(f"{base}agents/{first['id']}/tools/", calls, format="json").status_code == 201
    api.post(f"{base}secrets/", {"name": "API_TOKEN", "value": "never-exported"}, format="json")
    job = api.post(f"{base}agents/{second['id']}/context/",
                   {"documents": ["Tea is served at four.", "The lift is on the left."]},
                   format="json").json()  # fmt: skip
    finished(api, f"{base}agents/{second['id']}/context/jobs/{job['job_id']}/")
    pinned = api.post(f"{base}chat/", {"agent_id": first["id"], "agent_version": 1},
                      format="json").json()  # fmt: skip
    plain = api.post(f"{base}chat/", {"agent_id": second["id"], "title": "t"}, format="json").json()
    for session in (pinned, plain):
        posted = api.post(f"{base}chat/{session['id']}/messages/", {"content": "When is tea?"},
                          format="json").json()  # fmt: skip

        class P:
            id = made["id"]
            owner_id = user.id

        kind, _ = wait_for_event(redis_client, P, session["id"],
                                 types={"message.completed", "message.error"},
                                 message_id=posted["assistant_message_id"])  # fmt: skip
    Run.objects.filter(session_id=plain["id"]).update(steps=[{"tool": "x", "ok": True}])
    UsageDaily.objects.create(project_id=made["id"], user_id=user.id,
                              day=timezone.now().date() - timedelta(days=100), model="old",
                              runs=3, total_tokens=30)  # fmt: skip

    # Bad input writes nothing; another user reaches nothing.
    assert api.post(f"{base}exports/", {"x": 1}, format="json").status_code == 400
    assert other_api.post(f"{base}exports/", {}, format="json").status_code == 404
    assert not ArchiveJob.objects.exists()

    export = api.post(f"{base}exports/", {}, format="json")
    assert export.status_code == 202, export.content
    export = finished(api, f"{base}exports/{export.json()['id']}/")
    assert export["counts"]["messages"] == 4 and export["counts"]["context"] >= 3
    original = archive_of(api, made["id"], export["id"])
    text = json.dumps(original)
    assert "never-exported" not in text and "API_TOKEN" in text
    assert other_api.get(f"{base}exports/{export['id']}/archive/").status_code == 404
    for body, code in (({"export_id": export["id"]}, 404), ({"export_id": "x"}, 400), ({}, 400)):
        assert other_api.post("/my/projects/import/", body, format="json").status_code == code
    assert ArchiveJob.objects.count() == 1

    started = api.post("/my/projects/import/", {"export_id": export["id"]}, format="json")
    assert started.status_code == 202, started.content
    imported = finished(api, f"/my/projects/imports/{started.json()['id']}/")
    assert other_api.get(f"/my/projects/imports/{imported['id']}/").status_code == 404
    assert imported["counts"]["secrets_to_set"] == ["API_TOKEN"]
    new_id = imported["project_id"]
    assert new_id != made["id"]
    new_base = f"/my/projects/{new_id}/"
    assert imported["counts"]["context_jobs"]
    # The context comes back embedded again: as many chunks per agent as it had.
    for name in ("first", "second"):
        old_agent = Agent.objects.get(project_id=made["id"], name=name)
        new_agent = Agent.objects.get(project_id=new_id, name=name)
        want = context_count(old_agent)
        wait_until(lambda a=new_agent, w=want: context_count(a) == w, what=f"{name}'s context")

    again = api.post(f"{new_base}exports/", {}, format="json").json()
    again = finished(api, f"{new_base}exports/{again['id']}/")
    copy = archive_of(api, new_id, again["id"])
    # New ids everywhere; nothing of the original project is named by the copy.
    assert not (
        {r["id"] for r in copy["agents.jsonl"]} & {r["id"] for r in original["agents.jsonl"]}
    )
    assert made["id"] not in json.dumps(copy)
    # Equal but for secrets: their names come back as names to set, never as values.
    assert copy.pop("secrets.jsonl") == [] and original.pop("secrets.jsonl")
    mine, theirs = canonical(copy), canonical(original)
    assert mine.keys() == theirs.keys()
    for name in theirs:
        assert mine[name] == theirs[name], name
    assert Message.objects.filter(session__project_id=new_id).count() == 4
    # The archives go with their project.
    assert exports_dir(made["id"]).exists()
    assert api.delete(base).status_code == 204
    wait_until(lambda: not exports_dir(made["id"]).exists(), what="archives removed")


def test_keys_cannot_export_or_import(api, project):
    key = api.post(f"/my/projects/{project.id}/keys/", {"name": "k", "scopes": ["read", "write"]},
                   format="json").json()["key"]  # fmt: skip
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    assert client.post(f"/my/projects/{project.id}/exports/", {}, format="json").status_code == 403
    assert client.post("/my/projects/import/", {"export_id": str(project.id)},
                       format="json").status_code == 403  # fmt: skip
    assert not ArchiveJob.objects.exists()
    assert Token.objects.filter(user=project.owner).exists()
