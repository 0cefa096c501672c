"""An export or an import outlives the worker that runs it: the whole worker is SIGKILLed
mid-job, and the job ends `done` on another worker within seconds (not the broker's
visibility timeout, an hour), the import's project made once. An import sent again after
its records were made goes on without making them twice; a task of an attempt the
recovery pass replaced does nothing; a job whose message was lost is sent again; one
whose worker keeps dying ends in error. An import whose task fails (the database drops
its worker's connections mid-import) is sent again and done; one whose task keeps
failing ends in error, its upload removed. Faults are real: a Redis and worker
processes of the test's own, sessions the test's PostgreSQL server ends."""

from __future__ import annotations

import json
import time
import zipfile
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from agentbus import MAINTENANCE_QUEUE, project_tombstone, queue_depth
from chat.models import Message
from lifecycle.exports import (
    _import_records,
    archive_path,
    archive_read,
    export_run,
    import_run,
    upload_path,
)
from lifecycle.models import ArchiveJob
from lifecycle.recovery import GIVEN_BACK, archive_job_give_back, archive_jobs_recover
from projects.models import Project
from tests.factories import AgentFactory, ChatSessionFactory
from tests.tcp_cut import TcpCut
from tests.workers import SESSIONS_NAME, end_sessions, wait_for, wait_until

pytestmark = [
    pytest.mark.slow,
    pytest.mark.django_db(transaction=True),
    pytest.mark.parametrize("own_redis", ["empty"], indirect=True),
]

# Enough messages that writing (or importing) them takes a worker seconds, so the test
# kills it mid-job.
MESSAGES = 30_000


def with_messages(project, count: int):
    """`project` with an agent and a session of `count` messages."""
    agent = AgentFactory(project=project, name="keeper")
    session = ChatSessionFactory(project=project, agent=agent)
    Message.objects.bulk_create(
        Message(
            session=session,
            role="user" if i % 2 else "assistant",
            content=f"Message {i}: the north dock keeps parcel PX-{i:05d}.",
        )  # fmt: skip
        for i in range(count)
    )
    return project


@pytest.fixture
def big_project(project):
    return with_messages(project, MESSAGES)


def worker_env(tmp_path) -> dict[str, str]:
    return {"QDRANT_PATH": str(tmp_path / "qdrant"), "AGENTBUS_HEARTBEAT_SECONDS": "1"}


def start_worker(worker_process, tmp_path, *, sessions: str = "", env: dict | None = None):
    """A worker of the maintenance queue; `sessions` names its PostgreSQL sessions."""
    env = {**worker_env(tmp_path), **({"PGAPPNAME": sessions} if sessions else {}), **(env or {})}
    worker = worker_process("-Q", MAINTENANCE_QUEUE, "-P", "threads", "-c", "2", env=env)
    worker.wait_started()
    return worker


def kill_once_running(worker, job_id) -> float:
    """SIGKILL the worker's process group as soon as it runs the job."""
    wait_until(
        lambda: ArchiveJob.objects.filter(id=job_id, status="running").exclude(worker=""),
        timeout=60, interval=0.02, what="the job running",
    )  # fmt: skip
    worker.kill_group()
    killed = time.monotonic()
    job = ArchiveJob.objects.get(id=job_id)
    assert job.status == "running", (job.status, job.error)  # killed mid-job
    return killed


def done_by_another(first, response, worker_process, tmp_path, what: str) -> ArchiveJob:
    """Kill `first` once it runs the job `response` started, start another worker, and
    run the recovery pass until the job ends: done, well within the broker's visibility
    timeout (an hour)."""
    assert response.status_code == 202, response.content
    job_id = response.json()["id"]
    killed = kill_once_running(first, job_id)
    start_worker(worker_process, tmp_path)
    job = recover_until_ended(job_id)
    took = time.monotonic() - killed
    print(f"{what}: worker killed mid-job to done: {took:.2f}s")
    assert job is not None and job.status == "done", ArchiveJob.objects.get(id=job_id).error
    assert took < 90, took  # not the visibility timeout (an hour); room for a loaded machine
    return job


def recover_until_ended(job_id, timeout=90.0) -> ArchiveJob:
    """Run the recovery pass (beat's job) until the job has ended."""

    def ended():
        archive_jobs_recover()
        job = ArchiveJob.objects.get(id=job_id)
        return job if job.status in ("done", "error") else None

    return wait_for(ended, timeout=timeout, interval=0.5)


def export_done(api, project) -> dict:
    """An export of `project`, once it is done."""
    exported = api.post(f"/my/projects/{project.id}/exports/", {}, format="json").json()
    wait_until(
        lambda: ArchiveJob.objects.filter(id=exported["id"], status="done"),
        timeout=120, what="the export",
    )  # fmt: skip
    return exported


def test_an_export_whose_worker_is_killed_mid_export_is_written_by_another(
    own_redis, api, big_project, worker_process, tmp_path, settings
):
    settings.AGENTBUS_HEARTBEAT_SECONDS = 1  # a killed worker is gone within 3 s
    first = start_worker(worker_process, tmp_path)
    response = api.post(f"/my/projects/{big_project.id}/exports/", {}, format="json")
    job = done_by_another(first, response, worker_process, tmp_path, "export")
    assert job.attempt == 2 and job.counts["messages"] == MESSAGES
    manifest, files = archive_read(archive_path(job))
    assert len(files["messages.jsonl"]) == MESSAGES
    # Nothing of the killed attempt is left beside the archive.
    assert [p.name for p in archive_path(job).parent.iterdir()] == [archive_path(job).name]


def test_an_import_whose_worker_is_killed_mid_import_makes_the_project_once(
    own_redis, api, user, big_project, worker_process, tmp_path, settings
):
    settings.AGENTBUS_HEARTBEAT_SECONDS = 1
    first = start_worker(worker_process, tmp_path)
    agent = big_project.agents.get()
    context = f"/my/projects/{big_project.id}/agents/{agent.id}/context/"
    documents = [f"Shelf {i} of the north dock holds parcel PX-{i:05d}." for i in range(3)]
    added = api.post(context, {"documents": documents}, format="json").json()["job_id"]
    wait_until(
        lambda: api.get(f"{context}jobs/{added}/").json()["status"] == "done",
        timeout=60, what="the context stored",
    )  # fmt: skip
    exported = export_done(api, big_project)
    response = api.post("/my/projects/import/", {"export_id": exported["id"]}, format="json")
    job = done_by_another(first, response, worker_process, tmp_path, "import")
    copies = Project.objects.filter(owner=user, name=big_project.name).exclude(id=big_project.id)
    assert copies.count() == 1
    assert Message.objects.filter(session__project=copies.get()).count() == MESSAGES
    # Its context queued for the copy's agent of the same name, once.
    assert job.counts["context"] == 3 and len(job.counts["context_jobs"]) == 1


def import_running(api, project) -> str:
    """Export `project`, import the export, and wait until a worker runs the import."""
    exported = export_done(api, project)
    response = api.post("/my/projects/import/", {"export_id": exported["id"]}, format="json")
    assert response.status_code == 202, response.content
    job_id = response.json()["id"]
    wait_until(
        lambda: ArchiveJob.objects.filter(id=job_id, status="running").exclude(worker=""),
        timeout=60, interval=0.02, what="the import running",
    )  # fmt: skip
    return job_id


def assert_given_back(job_id, worker, *, timeout: float) -> None:
    """Wait until the job's failed task has given it back (no worker holds it)."""
    given_back = wait_for(
        lambda: ArchiveJob.objects.filter(id=job_id, worker=GIVEN_BACK).exists(), timeout=timeout
    )
    assert given_back, (ArchiveJob.objects.filter(id=job_id).values().first(), worker.log())


def assert_imported_once_on_a_second_attempt(job, project, messages: int) -> None:
    assert job.attempt == 2
    copies = Project.objects.filter(owner=project.owner, name=project.name).exclude(id=project.id)
    assert copies.count() == 1
    assert Message.objects.filter(session__project=copies.get()).count() == messages


@pytest.mark.skipif(
    connection.vendor != "postgresql", reason="ends the worker's PostgreSQL sessions"
)
def test_an_import_whose_database_sessions_end_mid_import_is_sent_again_and_done(
    own_redis, api, user, project, worker_process, tmp_path, settings
):
    """The database ends the worker's sessions while it runs the import (as a restart
    or a failover does): whatever it was writing is rolled back, the task fails and
    gives the job back, and the pass sends it again: done, the project made once,
    instead of the import ending in error on a blip. (Any moment before the job's end
    is written will do: that write needs the database too.)"""
    messages = 10_000
    big_project = with_messages(project, messages)
    worker = start_worker(worker_process, tmp_path, sessions=SESSIONS_NAME)
    job_id = import_running(api, big_project)
    assert end_sessions() >= 1  # the import's, at least
    ended = time.monotonic()
    assert_given_back(job_id, worker, timeout=60)
    job = recover_until_ended(job_id)
    print(f"import: sessions ended mid-import to done: {time.monotonic() - ended:.2f}s")
    assert job is not None and job.status == "done", (job and job.error, worker.log())
    assert_imported_once_on_a_second_attempt(job, big_project, messages)


@pytest.mark.skipif(connection.vendor != "postgresql", reason="takes the worker's PostgreSQL away")
def test_an_import_whose_database_goes_away_is_given_back_once_it_is_back(
    own_redis, api, user, project, worker_process, tmp_path, settings
):
    """The worker's database goes away while it runs the import: the task fails, and the
    give-back, which needs the database too, fails with it. The worker tries it again
    until the database is back (common.owed), and the pass then sends the job again:
    done, the project made once, instead of `running` for good (archive jobs have no
    expiry, and the job's worker still beats)."""
    messages = 3_000  # any moment before the job's end is written will do
    big_project = with_messages(project, messages)
    db = connection.settings_dict
    cut = TcpCut(db["HOST"] or "127.0.0.1", int(db["PORT"] or 5432))
    try:
        through = f"postgres://{db['USER']}:{db['PASSWORD']}@127.0.0.1:{cut.port}/{db['NAME']}"
        worker = start_worker(worker_process, tmp_path,
                              env={"DATABASE_URL": through, "OWED_RETRY_SECONDS": "0.5",
                                   "DB_WORKER_POOL_TIMEOUT_SECONDS": "2"})  # fmt: skip
        job_id = import_running(api, big_project)
        cut.cut()
        assert wait_for(
            lambda: "could not be given back yet" in worker.log_path.read_text(), timeout=60
        ), worker.log()
        assert ArchiveJob.objects.get(id=job_id).worker not in ("", GIVEN_BACK)
        cut.restore()
        back = time.monotonic()
        assert_given_back(job_id, worker, timeout=30)
        job = recover_until_ended(job_id)
        print(f"import: database back to done: {time.monotonic() - back:.2f}s")
    finally:
        cut.close()
    assert job is not None and job.status == "done", (job and job.error, worker.log())
    assert_imported_once_on_a_second_attempt(job, big_project, messages)


def test_an_import_whose_task_keeps_failing_ends_in_error_and_leaves_no_upload(
    own_redis, user, project, settings
):
    settings.RUN_MAX_STARTS = 2
    job = ArchiveJob.objects.create(kind="import", owner=user, status="running", worker="w#1")
    upload_path(job).parent.mkdir(parents=True, exist_ok=True)
    upload_path(job).write_bytes(b"an uploaded archive")
    archive_job_give_back(job_id=str(job.id), attempt=2)  # of an attempt not owed
    assert ArchiveJob.objects.get(id=job.id).worker == "w#1"
    archive_job_give_back(job_id=str(job.id), attempt=1)
    assert archive_jobs_recover()["redone"] == 1
    ArchiveJob.objects.filter(id=job.id).update(status="running", worker="w#1")
    archive_job_give_back(job_id=str(job.id), attempt=2)
    assert archive_jobs_recover()["failed"] == 1
    job.refresh_from_db()
    assert job.status == "error" and job.error.startswith("the job's task failed 2 times")
    assert not upload_path(job).exists()


def test_an_import_whose_project_is_deleted_before_its_context_ends_quietly(
    own_redis, user, project
):
    """The new project deleted between the records and the context: the import does not
    fail (its task would be sent again for nothing); the job goes with its project."""
    agent = AgentFactory(project=project, name="keeper")
    export = ArchiveJob.objects.create(kind="export", owner=user, project=project)
    export_run(job_id=export.id)
    path = archive_path(export)
    with zipfile.ZipFile(path) as archive:  # the agent's context: one document
        members = {name: archive.read(name) for name in archive.namelist()}
    manifest = json.loads(members["manifest.json"])
    manifest["counts"]["context"] = 1
    members["manifest.json"] = json.dumps(manifest).encode()
    members[f"context/{agent.id}.jsonl"] = b'{"text": "a document", "metadata": {}}\n'
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    job = ArchiveJob.objects.create(kind="import", owner=user, source=export, status="running")
    assert _import_records(job, *archive_read(path))
    job.refresh_from_db()
    project_tombstone(job.project_id)
    assert import_run(job_id=job.id, attempt=1).status == "running"


def test_an_import_sent_again_after_its_records_goes_on_and_makes_them_once(
    own_redis, api, user, project
):
    """The state a worker killed right after the records' commit leaves: the job names
    its project, its context not queued. Run again, it queues the context and ends, with
    no second project."""
    agent = AgentFactory(project=project, name="keeper")
    ChatSessionFactory(project=project, agent=agent)
    export = ArchiveJob.objects.create(kind="export", owner=user, project=project)
    export_run(job_id=export.id)
    job = ArchiveJob.objects.create(kind="import", owner=user, source=export)
    manifest, files = archive_read(archive_path(export))
    assert _import_records(job, manifest, files)
    job.refresh_from_db()
    assert job.project_id and job.counts["agents"] == 1
    assert not _import_records(job, manifest, files)  # made once

    done = import_run(job_id=job.id, attempt=1)
    assert done.status == "done", done.error
    assert done.project_id == job.project_id
    assert Project.objects.filter(owner=user).count() == 2  # the original and one copy
    assert done.counts["agents"] == 1 and done.counts["context"] == 0


def test_a_task_of_a_replaced_attempt_does_nothing(own_redis, user, project):
    job = ArchiveJob.objects.create(kind="export", owner=user, project=project, attempt=2)
    assert export_run(job_id=job.id, attempt=1).status == "queued"
    imported = ArchiveJob.objects.create(kind="import", owner=user, source=job, attempt=2)
    assert import_run(job_id=imported.id, attempt=None).status == "queued"  # an old release's
    assert not archive_path(job).parent.exists()
    assert Project.objects.filter(owner=user).count() == 1


def test_a_job_whose_message_was_lost_is_sent_again_once(own_redis, user, project, settings):
    """Queued, never started, its queue empty (Redis lost the message, or the publish
    after the commit failed): past RUN_REDISPATCH_SECONDS the pass sends it again, under
    the next attempt, and not again while that message waits."""
    sent = timezone.now() - timedelta(seconds=settings.RUN_REDISPATCH_SECONDS + 1)
    job = ArchiveJob.objects.create(kind="export", owner=user, project=project, sent_at=sent)
    fresh = ArchiveJob.objects.create(kind="export", owner=user, project=project)
    assert queue_depth(project.id) == 0
    assert archive_jobs_recover()["redone"] == 1
    job.refresh_from_db()
    assert (job.attempt, job.status) == (2, "queued")
    assert queue_depth(project.id) == 1
    assert ArchiveJob.objects.get(id=fresh.id).attempt == 1  # sent just now: left alone
    ArchiveJob.objects.filter(id=job.id).update(sent_at=sent)
    assert archive_jobs_recover()["redone"] == 0  # its message is waiting


def test_a_job_whose_worker_keeps_dying_ends_in_error(own_redis, user, project, settings):
    settings.RUN_MAX_STARTS = 2
    job = ArchiveJob.objects.create(
        kind="export", owner=user, project=project, status="running", worker="gone@host#1"
    )
    assert archive_jobs_recover()["redone"] == 1
    job.refresh_from_db()
    assert (job.attempt, job.worker) == (2, "")
    ArchiveJob.objects.filter(id=job.id).update(status="running", worker="gone@host#2")
    assert archive_jobs_recover()["failed"] == 1
    job.refresh_from_db()
    assert job.status == "error" and "lost its worker 2 times" in job.error
    assert archive_jobs_recover() == {"redone": 0, "failed": 0, "moved": 0}
    assert export_run(job_id=job.id, attempt=2).status == "error"  # its late message
