"""Importing an uploaded archive: an export downloaded and uploaded again comes back equal
but for ids and secrets (memory blocks, webhooks and schedules included); a bad archive
is a clear 400 (or 413) with nothing written; an archive naming another tenant's records
reaches none of them. Memory block definitions are part of agent versions."""

from __future__ import annotations

import io
import json
import tracemalloc
import uuid
import zipfile
from datetime import timedelta

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.utils import timezone

from agents.models import Agent, AgentVersion, MemoryBlock
from agents.services import agent_update
from automation.models import Schedule, WebhookEndpoint
from chat.models import ChatSession, Message, Run
from lifecycle import apis as lifecycle_apis
from lifecycle.archive_schema import archive_open
from lifecycle.exports import archive_path, export_run, upload_path, uploads_dir
from lifecycle.models import ArchiveJob
from projects.models import Project
from tests.factories import AgentFactory, ChatSessionFactory, ProjectFactory
from tests.lifecycle.test_export_import import archive_of, canonical, finished
from tests.runtime.conftest import context_count
from tests.workers import wait_until

IMPORT = "/my/projects/import/"


def upload(client, data: bytes, name: str = "project.zip"):
    body = {"archive": SimpleUploadedFile(name, data, content_type="application/zip")}
    return client.post(IMPORT, body, format="multipart")


def zipped(files: dict[str, object], *, manifest: object | None = None) -> bytes:
    """An archive of `files` ({name: records, or raw bytes}) with `manifest`."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        if manifest is not None:
            archive.writestr("manifest.json", json.dumps(manifest))
        for name, rows in files.items():
            if isinstance(rows, bytes):
                archive.writestr(name, rows)
            else:
                archive.writestr(name, "".join(json.dumps(r) + "\n" for r in rows))
    return out.getvalue()


def unzipped(data: bytes) -> tuple[dict, dict[str, list[dict]]]:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        manifest = json.loads(archive.read("manifest.json"))
        files = {n: [json.loads(line) for line in archive.read(n).splitlines()]
                 for n in archive.namelist() if n.endswith(".jsonl")}  # fmt: skip
    return manifest, files


def download(api, project_id, job_id) -> bytes:
    response = api.get(f"/my/projects/{project_id}/exports/{job_id}/archive/")
    assert response.status_code == 200, response.content
    return b"".join(response.streaming_content)


def test_an_uploaded_export_comes_back_equal_but_for_ids_and_secrets(
    live_worker, api, user, other_api, other_user, transactional_db
):
    made = api.post("/my/projects/", {"name": "uploaded"}, format="json").json()
    base = f"/my/projects/{made['id']}/"
    first = api.post(f"{base}agents/", {"name": "first", "system_prompt": "v1"},
                     format="json").json()  # fmt: skip
    second = api.post(f"{base}agents/", {"name": "second"}, format="json").json()
    api.patch(f"{base}agents/{first['id']}/", {"system_prompt": "v2"}, format="json")
    memory = f"{base}agents/{first['id']}/memory/"
    block = {"label": "persona", "value": "Calm.", "limit": 500, "description": "Who I am"}
    assert api.post(memory, block, format="json").status_code == 201
    assert api.patch(f"{memory}persona/", {"limit": 800}, format="json").status_code == 200
    kind = api.patch(f"{memory}persona/", {"value": "Calm, kind."}, format="json")
    assert kind.status_code == 200
    calls = {"kind": "agent", "name": "ask_second", "target_agent_id": second["id"]}
    assert api.post(f"{base}agents/{first['id']}/tools/", calls, format="json").status_code == 201
    api.post(f"{base}secrets/", {"name": "API_TOKEN", "value": "never-exported"}, format="json")
    job = api.post(f"{base}agents/{second['id']}/context/",
                   {"documents": ["Tea is served at four.", "The lift is on the left."]},
                   format="json").json()  # fmt: skip
    finished(api, f"{base}agents/{second['id']}/context/jobs/{job['job_id']}/")
    session = ChatSession.objects.create(project_id=made["id"], agent_id=first["id"], title="s")
    asked = Message.objects.create(session=session, role="user", content="When is tea?")
    answer = Message.objects.create(session=session, role="assistant", content="At four.")
    Run.objects.create(session=session, message=answer, agent_id=first["id"], status="done",
                       steps=[{"tool": "x", "ok": True}], finished_at=timezone.now())  # fmt: skip
    hook = WebhookEndpoint.objects.create(project_id=made["id"], url="https://example.com/hook",
                                          events=["run.completed", "run.failed"],
                                          secret="whsec_original")  # fmt: skip
    Schedule.objects.create(project_id=made["id"], agent_id=first["id"], session=session,
                            name="weekly", content="Report", kind="cron", cron="0 9 * * 1",
                            timezone="Europe/Berlin", enabled=True)  # fmt: skip
    assert asked.id

    # Memory block definitions are versioned: the block made a version, its new limit
    # another; a change of its value (memory, not definition) none.
    versions = AgentVersion.objects.filter(agent_id=first["id"]).order_by("number")
    persona = [{"label": "persona", "limit": 500, "description": "Who I am"}]
    wider = [{**persona[0], "limit": 800}]
    # v1 made, v2 prompt, v3 block, v4 its limit, v5 the tool: the value made none.
    assert [v.sections["memory_blocks"] for v in versions] == [[], [], persona, wider, wider]

    export = api.post(f"{base}exports/", {}, format="json").json()
    export = finished(api, f"{base}exports/{export['id']}/")
    assert {"memory_blocks": 1, "webhooks": 1, "schedules": 1}.items() <= export["counts"].items()
    data = download(api, made["id"], export["id"])
    assert b"whsec_original" not in data and b"never-exported" not in data

    started = upload(api, data)
    assert started.status_code == 202, started.content
    status_url = f"/my/projects/imports/{started.json()['id']}/"
    imported = finished(api, status_url)
    assert imported["counts"]["switched_off"] == {"webhooks": 1, "schedules": 1}
    assert imported["counts"]["secrets_to_set"] == ["API_TOKEN"]
    new_id = imported["project_id"]
    # The upload went once it was imported.
    assert not (uploads_dir() / f"{uuid.UUID(imported['id']).hex}.zip").exists()
    # The new webhook's secret, once: a new one, not the original.
    [(endpoint_id, secret)] = imported["webhook_secrets"].items()
    assert secret.startswith("whsec_") and secret != "whsec_original"
    assert WebhookEndpoint.objects.get(id=endpoint_id, project_id=new_id).secret == secret
    assert api.get(status_url).json()["webhook_secrets"] == {}
    assert not Schedule.objects.get(project_id=new_id).enabled
    assert not WebhookEndpoint.objects.get(project_id=new_id).enabled
    for name in ("first", "second"):
        old = Agent.objects.get(project_id=made["id"], name=name)
        new = Agent.objects.get(project_id=new_id, name=name)
        want = context_count(old)
        wait_until(lambda a=new, w=want: context_count(a) == w, what=f"{name}'s context")

    again = api.post(f"/my/projects/{new_id}/exports/", {}, format="json").json()
    again = finished(api, f"/my/projects/{new_id}/exports/{again['id']}/")
    copy = archive_of(api, new_id, again["id"])
    _, original = unzipped(data)
    assert made["id"] not in json.dumps(copy) and hook.id.hex not in json.dumps(copy)
    assert copy.pop("secrets.jsonl") == [] and original.pop("secrets.jsonl")
    # Equal but for what the import switched off on purpose.
    for name in ("webhooks.jsonl", "schedules.jsonl"):
        original[name] = [{**r, "enabled": False} for r in original[name]]
    mine, theirs = canonical(copy), canonical(original)
    assert mine.keys() == theirs.keys()
    for name in theirs:
        assert mine[name] == theirs[name], name
    assert MemoryBlock.objects.get(agent__project_id=new_id).value == "Calm, kind."

    # Another tenant uploads an archive that names this user's records by their ids:
    # they get a project of their own, and nothing of this user's is touched or named.
    _, files = unzipped(data)
    mine_before = (Agent.objects.filter(project_id=made["id"]).count(),
                   Message.objects.filter(session__project_id=made["id"]).count())  # fmt: skip
    theirs_started = upload(other_api, data)
    assert theirs_started.status_code == 202, theirs_started.content
    assert other_api.get(status_url).status_code == 404
    assert api.get(f"/my/projects/imports/{theirs_started.json()['id']}/").status_code == 404
    theirs = finished(other_api, f"/my/projects/imports/{theirs_started.json()['id']}/")
    their_project = Project.objects.get(id=theirs["project_id"])
    assert their_project.owner_id == other_user.id
    their_agents = set(Agent.objects.filter(project=their_project).values_list("id", flat=True))
    assert not their_agents & {uuid.UUID(r["id"]) for r in files["agents.jsonl"]}
    mine_after = (Agent.objects.filter(project_id=made["id"]).count(),
                  Message.objects.filter(session__project_id=made["id"]).count())  # fmt: skip
    assert mine_after == mine_before
    assert Project.objects.filter(owner=user).count() == 2  # the original and its copy


# --- Bad archives: a 400 (or 413), nothing written --------------------------------------


@pytest.fixture
def exported(db, user, runtime_settings):
    """A real export (in this process) of a small project of `user`'s, as (manifest, files)."""
    project = ProjectFactory(owner=user)
    agent = AgentFactory(project=project, name="a")
    session = ChatSessionFactory(agent=agent, project=project)
    Message.objects.create(session=session, role="user", content="hi")
    answer = Message.objects.create(session=session, role="assistant", content="hello")
    Run.objects.create(session=session, message=answer, agent=agent, status="done")
    MemoryBlock.objects.create(agent=agent, label="notes", value="v", limit=100)
    WebhookEndpoint.objects.create(project=project, url="https://example.com/h",
                                   events=["run.completed"], secret="whsec_x")  # fmt: skip
    Schedule.objects.create(
        project=project,
        agent=agent,
        session=session,
        name="n",
        content="c",
        kind="once",
        run_at=timezone.now() - timedelta(days=1),
    )
    job = ArchiveJob.objects.create(kind="export", owner=user, project=project)
    job = export_run(job_id=job.id)
    assert job.status == "done", job.error
    return unzipped(archive_path(job).read_bytes())


def uploads() -> set[str]:
    return {p.name for p in uploads_dir().glob("*")} if uploads_dir().exists() else set()


@pytest.fixture(autouse=True)
def uploads_before():
    return uploads()


def nothing_written(before_projects: int, before_uploads: set[str]) -> None:
    assert Project.objects.count() == before_projects
    assert not ArchiveJob.objects.filter(kind="import").exists()
    assert uploads() == before_uploads


def test_a_valid_upload_is_accepted(api, exported):
    manifest, files = exported
    response = upload(api, zipped(files, manifest=manifest))
    assert response.status_code == 202, response.content
    job = ArchiveJob.objects.get(kind="import")
    assert job.status == "queued" and upload_path(job).exists()
    upload_path(job).unlink()  # no worker here to import it


def _set(files, file, index, **values):
    files[file][index].update(values)


MUTATIONS = {
    "wrong version": lambda m, f: m.update(version=99),
    "wrong format": lambda m, f: m.update(format="other"),
    "unknown section": lambda m, f: (
        m["sections"].append("passwords"),
        f.update({"passwords.jsonl": []}),
    ),  # fmt: skip
    "count differs": lambda m, f: m["counts"].update(messages=7),
    "unknown field": lambda m, f: _set(f, "messages.jsonl", 0, admin=True),
    "missing field": lambda m, f: f["messages.jsonl"][0].pop("role"),
    "bad choice": lambda m, f: _set(f, "messages.jsonl", 0, role="root"),
    "too long": lambda m, f: _set(f, "agents.jsonl", 0, name="x" * 201),
    "wrong type": lambda m, f: _set(f, "runs.jsonl", 0, steps="rm -rf"),
    "bad time": lambda m, f: _set(f, "sessions.jsonl", 0, created_at="yesterday"),
    "NUL in text": lambda m, f: _set(f, "messages.jsonl", 0, content="a\x00b"),
    "message of a foreign session": lambda m, f: _set(
        f, "messages.jsonl", 0, session_id=str(uuid.uuid4())
    ),  # fmt: skip
    "run of a foreign message": lambda m, f: _set(f, "runs.jsonl", 0, message_id=10**9),
    "foreign agent": lambda m, f: _set(f, "memory_blocks.jsonl", 0, agent_id=str(uuid.uuid4())),
    "unknown version": lambda m, f: _set(f, "sessions.jsonl", 0, agent_version=9),
    "duplicate label": lambda m, f: f["memory_blocks.jsonl"].append(
        dict(f["memory_blocks.jsonl"][0])
    ),  # fmt: skip
    "bad cron": lambda m, f: _set(f, "schedules.jsonl", 0, kind="cron", cron="every day"),
    "bad webhook event": lambda m, f: _set(f, "webhooks.jsonl", 0, events=["run.deleted"]),
    "webhook not http": lambda m, f: _set(f, "webhooks.jsonl", 0, url="file:///etc/passwd"),
    "secret values": lambda m, f: (
        _set(f, "secrets.jsonl", 0, value="x")
        if f["secrets.jsonl"]
        else f["secrets.jsonl"].append({"name": "K", "value": "v"})
    ),
    "bad version section": lambda m, f: f["agents.jsonl"][0].update(
        versions=[
            {
                "number": 1,
                "name": "a",
                "system_prompt": "",
                "model": "",
                "params": {},
                "busy_policy": "",
                "tools": [],
                "sections": {"other": [1]},
                "restored_from": None,
                "created_at": "2026-01-01T00:00:00+00:00",
            }
        ]
    ),  # fmt: skip
    "params not an object": lambda m, f: _set(f, "agents.jsonl", 0, params=[1]),
    "context of a foreign agent": lambda m, f: f.update(
        {f"context/{uuid.uuid4()}.jsonl": [{"text": "x", "metadata": {}}]}
    ),  # fmt: skip
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_a_bad_record_is_a_400_that_says_where(api, exported, mutation, uploads_before):
    manifest, files = exported
    MUTATIONS[mutation](manifest, files)
    before = Project.objects.count()
    response = upload(api, zipped(files, manifest=manifest))
    assert response.status_code == 400, (mutation, response.content)
    assert response.json()["archive"], response.content
    nothing_written(before, uploads_before)


def raw_zip(members: list[tuple[zipfile.ZipInfo | str, bytes]]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for info, data in members:
            archive.writestr(info, data)
    return out.getvalue()


def _link() -> zipfile.ZipInfo:
    info = zipfile.ZipInfo("messages.jsonl")
    info.external_attr = 0o120777 << 16  # a symbolic link
    return info


BAD_ZIPS = {
    "not a zip": b"PK\x03\x04 but nothing more",
    "empty": b"",
    "no manifest": raw_zip([("agents.jsonl", b"")]),
    "path traversal": raw_zip([("manifest.json", b"{}"), ("../../etc/cron.d/x.jsonl", b"")]),
    "absolute path": raw_zip([("manifest.json", b"{}"), ("/tmp/x.jsonl", b"")]),
    "a folder": raw_zip([("manifest.json", b"{}"), ("context/", b"")]),
    "a link": raw_zip([("manifest.json", b"{}"), (_link(), b"/etc/passwd")]),
    "an unknown file": raw_zip([("manifest.json", b"{}"), ("run.sh", b"#!/bin/sh")]),
    "repeated name": raw_zip([("manifest.json", b"{}"), ("manifest.json", b"{}")]),
    "not JSON": raw_zip([("manifest.json", b"{nope")]),
    "NaN": raw_zip([("manifest.json", b'{"version": NaN}')]),
    "deep nesting": raw_zip([("manifest.json", b"[" * 100 + b"]" * 100)]),
    "not UTF-8": raw_zip([("manifest.json", b"\xff\xfe{}")]),
}


@pytest.mark.parametrize("case", list(BAD_ZIPS))
def test_a_broken_or_hostile_zip_is_a_400(api, db, case, uploads_before):
    before = Project.objects.count()
    response = upload(api, BAD_ZIPS[case])
    assert response.status_code == 400, (case, response.content)
    nothing_written(before, uploads_before)


def test_a_line_that_is_not_json_is_named_by_its_file_and_line(api, db, uploads_before):
    archive = raw_zip([("manifest.json", b"{}"), ("messages.jsonl", b'{"id": 1}\n{nope\n')])
    response = upload(api, archive)
    body = response.content.decode()
    assert response.status_code == 400 and "messages.jsonl line 2: not JSON" in body, body
    assert "unreadable" not in body
    nothing_written(0, uploads_before)


def test_a_zip_bomb_is_refused_before_it_is_unpacked(api, db, settings, uploads_before):
    settings.IMPORT_MAX_UNPACKED_BYTES = 1024 * 1024
    bomb = raw_zip([("manifest.json", b"{}"), ("messages.jsonl", b"\n" * (20 * 1024 * 1024))])
    assert len(bomb) < 100 * 1024  # 20 MiB of newlines in a small upload
    response = upload(api, bomb)
    assert response.status_code == 400 and "unpacks to more" in response.content.decode()
    settings.IMPORT_MAX_FILES = 3
    many = raw_zip([(f"context/{uuid.uuid4()}.jsonl", b"") for _ in range(4)])
    assert upload(api, many).status_code == 400
    nothing_written(0, uploads_before)


def test_an_upload_over_the_size_limit_is_a_413_and_other_bad_requests_400(
    api, db, settings, uploads_before
):
    settings.IMPORT_MAX_BYTES = 100
    response = upload(api, b"x" * 101)
    assert response.status_code == 413, response.content
    both = {"archive": SimpleUploadedFile("p.zip", b"x"), "export_id": str(uuid.uuid4())}
    assert api.post(IMPORT, both, format="multipart").status_code == 400
    assert api.post(IMPORT, {}, format="multipart").status_code == 400
    assert upload(api, b"").status_code == 400  # an empty file
    nothing_written(0, uploads_before)


def test_while_an_archive_is_checked_another_is_a_503_that_writes_nothing(
    api, db, settings, uploads_before
):
    """One check at a time per process (IMPORT_CHECKS_AT_ONCE): it holds the records."""
    assert settings.IMPORT_CHECKS_AT_ONCE == 1
    archive = zipped({}, manifest={"format": "not ours"})
    assert lifecycle_apis._archive_checks.acquire(blocking=False)  # a check under way
    try:
        response = upload(api, archive)
    finally:
        lifecycle_apis._archive_checks.release()
    assert response.status_code == 503 and int(response["Retry-After"]) > 0, response.content
    nothing_written(0, uploads_before)
    assert upload(api, archive).status_code == 400  # checked once the other is done


def test_imports_per_user_are_limited(api, other_api, db, rates):
    rates(imports_user="2/hour")
    archive = zipped({}, manifest={"format": "not ours"})
    assert [upload(api, archive).status_code for _ in range(3)] == [400, 400, 429]
    assert upload(other_api, archive).status_code == 400  # another user's own limit


def test_checking_an_archive_holds_its_records_not_its_bytes_too():
    """Before, the check held a member's bytes, then its lines (a copy), then its
    records: over three times the unpacked size at its peak. Line by line, the records
    are most of it."""
    line = json.dumps({"id": str(uuid.uuid4()), "content": "lorem ipsum " * 80}) + "\n"
    archive = zipped({"messages.jsonl": (line * 20_000).encode()}, manifest={})
    unpacked = len(line) * 20_000
    tracemalloc.start()
    try:
        manifest, files = archive_open(io.BytesIO(archive))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(files["messages.jsonl"]) == 20_000
    print(f"peak {peak / unpacked:.2f} x the unpacked size")
    assert peak < 2 * unpacked, peak / unpacked


def test_a_rollback_restores_memory_block_definitions_and_keeps_values(api, project):
    agent = AgentFactory(project=project)
    agent_update(agent=agent, data={"system_prompt": "p"})  # v1 (no blocks)
    memory = f"/my/projects/{project.id}/agents/{agent.id}/memory/"
    api.post(memory, {"label": "keep", "value": "kept value", "limit": 50}, format="json")
    v_keep = AgentVersion.objects.filter(agent=agent).order_by("-number").first().number
    api.post(memory, {"label": "extra", "value": "x"}, format="json")
    api.patch(f"{memory}keep/", {"limit": 900, "description": "d"}, format="json")
    api.delete(f"{memory}extra/")
    api.post(memory, {"label": "later", "value": "y"}, format="json")
    diff = api.get(f"/my/projects/{project.id}/agents/{agent.id}/versions/{v_keep}/diff/",
                   {"against": v_keep + 1}).json()  # fmt: skip
    assert "memory_blocks" in diff["sections"], diff
    response = api.post(f"/my/projects/{project.id}/agents/{agent.id}/versions/{v_keep}/rollback/",
                        {}, format="json")  # fmt: skip
    assert response.status_code in (200, 201), response.content
    blocks = {b.label: b for b in MemoryBlock.objects.filter(agent=agent)}
    assert set(blocks) == {"keep"}
    assert (blocks["keep"].limit, blocks["keep"].description) == (50, "")
    assert blocks["keep"].value == "kept value"  # memory, not definition: it stays
    latest = AgentVersion.objects.filter(agent=agent).order_by("-number").first()
    assert latest.restored_from == v_keep
    assert latest.sections["memory_blocks"] == [{"label": "keep", "limit": 50, "description": ""}]
