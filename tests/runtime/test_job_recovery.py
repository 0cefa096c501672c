"""A context job outlives the worker that runs it: the whole worker is SIGKILLed while
it fetches a file job's URL, or between the batches of a long ingest, and the job ends
`done` on another worker within seconds (not the broker's visibility timeout, an hour),
every document stored once. A step whose task fails (its worker's database connections
dropped under it) is sent again, and done. A job whose worker keeps dying ends in
error, and so does one whose step keeps failing; a task of a
step the recovery pass has already sent again does nothing, and neither does a clear
given back after its job ended. Faults are real: a Redis and worker processes of the
test's own."""

from __future__ import annotations

import time

import pytest
from django.db import connection

from agentbus import MAINTENANCE_QUEUE, ProjectGone, project_tombstone
from context import job_records
from context.jobs import context_job_add, context_job_clear
from context.models import ContextDocument
from context.recovery import jobs_recover
from context.services import context_clear_enqueue, context_documents_add
from tests.local_http import RunbookServer
from tests.runtime.conftest import context_count, put_context
from tests.runtime.test_context import context_url, search
from tests.workers import SESSIONS_NAME, end_sessions, wait_for, wait_until
from workspaces.redis import scoped

pytestmark = [
    pytest.mark.slow,
    pytest.mark.django_db(transaction=True),
    pytest.mark.parametrize("own_redis", ["empty"], indirect=True),
]


@pytest.fixture
def held_file():
    """A file server whose answer waits until the test releases it."""
    server = RunbookServer(held=True).start()
    yield server
    server.stop()


def worker_env(tmp_path) -> dict[str, str]:
    return {
        "QDRANT_PATH": str(tmp_path / "qdrant"),
        "VECTOR_STORE_LEASE_SECONDS": "2",
        "EGRESS_ALLOW_NETWORKS_FILES": "127.0.0.0/8",
        "INGEST_BATCH_DOCUMENTS": "2",
        "AGENTBUS_HEARTBEAT_SECONDS": "1",
    }


def job_of(api, agent, job_id) -> dict:
    response = api.get(f"{context_url(agent)}jobs/{job_id}/")
    assert response.status_code == 200, response.content
    return response.json()


def recover_until_ended(api, agent, job_id, timeout=90.0) -> dict:
    """Run the recovery pass (beat's job) until the job has ended."""

    def ended():
        jobs_recover()
        job = job_of(api, agent, job_id)
        return job if job["status"] in ("done", "error") else None

    job = wait_for(ended, timeout=timeout, interval=0.5)
    assert job, job_of(api, agent, job_id)
    return job


def test_a_file_job_whose_worker_is_killed_mid_fetch_is_done_by_another(
    own_redis, api, agent, worker_process, held_file, tmp_path, runtime_settings
):
    runtime_settings.EGRESS_ALLOW_NETWORKS = {"files": ["127.0.0.0/8"]}
    runtime_settings.AGENTBUS_HEARTBEAT_SECONDS = 1  # a killed worker is gone within 3 s
    first = worker_process("-Q", MAINTENANCE_QUEUE, "-P", "threads", "-c", "4",
                           env=worker_env(tmp_path))  # fmt: skip
    first.wait_started()
    response = api.post(f"{context_url(agent)}files/", {"url": held_file.url}, format="json")
    assert response.status_code == 202, response.content
    job_id = response.json()["job_id"]
    assert held_file.asked.wait(30), first.log()
    first.kill_group()
    held_file.release.set()
    killed = time.monotonic()

    second = worker_process("-Q", MAINTENANCE_QUEUE, "-P", "threads", "-c", "4",
                            env=worker_env(tmp_path))  # fmt: skip
    second.wait_started()
    job = recover_until_ended(api, agent, job_id)
    took = time.monotonic() - killed
    print(f"file job: worker killed mid-fetch to done: {took:.2f}s")
    assert job["status"] == "done", job
    assert took < 90, took  # not the visibility timeout (an hour); room for a loaded machine
    document = ContextDocument.objects.get(job_id=job_id)
    assert (document.status, document.chunks) == ("ready", 1)
    hits = search(api, agent, "qctl-restart-9")
    assert [h["source"] for h in hits].count(document.source) == 1


def test_an_ingest_whose_worker_is_killed_between_batches_stores_every_document_once(
    own_redis, api, agent, worker_process, tmp_path, settings
):
    settings.AGENTBUS_HEARTBEAT_SECONDS = 1
    documents = [f"Shelf {i} holds parcel code PX-{i:04d} for the north dock." for i in range(40)]
    first = worker_process("-Q", MAINTENANCE_QUEUE, "-P", "threads", "-c", "4",
                           env=worker_env(tmp_path))  # fmt: skip
    first.wait_started()
    response = api.post(context_url(agent), {"documents": documents}, format="json")
    assert response.status_code == 202, response.content
    job_id = response.json()["job_id"]
    wait_until(
        lambda: job_of(api, agent, job_id).get("stored_documents", 0) >= 6,
        what="the ingest under way",
    )
    first.kill_group()
    killed = time.monotonic()
    stored_when_killed = job_of(api, agent, job_id)["stored_documents"]
    assert stored_when_killed < 40

    second = worker_process("-Q", MAINTENANCE_QUEUE, "-P", "threads", "-c", "4",
                            env=worker_env(tmp_path))  # fmt: skip
    second.wait_started()
    job = recover_until_ended(api, agent, job_id)
    took = time.monotonic() - killed
    print(f"ingest: worker killed after {stored_when_killed} of 40 to done: {took:.2f}s")
    assert job["status"] == "done" and job["stored_documents"] == 40, job
    assert took < 90, took  # as above
    # Each document once: one hit per code, and as many points as documents.
    hits = search(api, agent, "parcel code PX-0039", k=50)
    assert len(hits) == 40
    assert len({h["text"] for h in hits}) == 40


@pytest.mark.skipif(
    connection.vendor != "postgresql", reason="drops the worker's PostgreSQL connections"
)
def test_a_file_job_whose_step_fails_is_sent_again_and_done(
    own_redis, api, agent, worker_process, held_file, tmp_path, runtime_settings
):
    """The database drops the worker's connections while it fetches the file (as a
    restart or a failover does): the step's task fails on its next write. It is given
    back, the recovery pass sends it again, and the job is done, instead of reading
    `running`, held by a worker that still beats, until its record expires."""
    runtime_settings.EGRESS_ALLOW_NETWORKS = {"files": ["127.0.0.0/8"]}
    runtime_settings.RUN_REDISPATCH_SECONDS = 0.5
    worker = worker_process("-Q", MAINTENANCE_QUEUE, "-P", "threads", "-c", "4",
                            env={**worker_env(tmp_path), "PGAPPNAME": SESSIONS_NAME})  # fmt: skip
    worker.wait_started()
    response = api.post(f"{context_url(agent)}files/", {"url": held_file.url}, format="json")
    assert response.status_code == 202, response.content
    job_id = response.json()["job_id"]
    assert held_file.asked.wait(30), worker.log()
    assert end_sessions() >= 1  # the one of the step, at least
    held_file.release.set()
    redis = scoped(agent.project.owner_id, agent.project_id)
    given_back = wait_for(
        lambda: (
            (job_records.job_get(redis=redis, job_id=job_id) or {}).get("holder")
            == job_records.GIVEN_BACK
        ),
        timeout=30,
    )
    assert given_back, (job_records.job_get(redis=redis, job_id=job_id), worker.log())
    failed = time.monotonic()
    assert job_records.job_get(redis=redis, job_id=job_id)["failed"] == "OperationalError"

    job = recover_until_ended(api, agent, job_id, timeout=30)
    print(f"file job: step failed to done: {time.monotonic() - failed:.2f}s")
    assert job["status"] == "done", (job, worker.log())
    document = ContextDocument.objects.get(job_id=job_id)
    assert (document.status, document.chunks) == ("ready", 1)
    hits = search(api, agent, "qctl-restart-9")
    assert [h["source"] for h in hits].count(document.source) == 1


def test_a_step_that_keeps_failing_ends_its_job_in_error(own_redis, agent, settings):
    """Given back RUN_MAX_STARTS times, each time sent again no sooner than
    RUN_REDISPATCH_SECONDS (doubled per try) after it failed: the job ends in error,
    naming the failure's class and nothing else of it."""
    settings.RUN_MAX_STARTS = 2
    settings.RUN_REDISPATCH_SECONDS = 3600
    job_id = context_documents_add(agent=agent, documents=[{"text": "a"}])
    redis = scoped(agent.project.owner_id, agent.project_id)
    step = job_records.job_get(redis=redis, job_id=job_id)["step"]
    assert job_records.step_given_back(
        redis=redis, job_id=job_id, step=step, error="OperationalError"
    )
    assert jobs_recover()["redone"] == 0  # not before RUN_REDISPATCH_SECONDS
    settings.RUN_REDISPATCH_SECONDS = 0
    for _ in range(settings.RUN_MAX_STARTS):
        step = job_records.job_get(redis=redis, job_id=job_id)["step"]
        assert job_records.step_given_back(
            redis=redis, job_id=job_id, step=step, error="OperationalError"
        )
        done = jobs_recover()
    job = job_records.job_get(redis=redis, job_id=job_id)
    assert job["status"] == "error", job
    assert job["error"].endswith("the last try failed with OperationalError"), job
    assert done["failed"] == 1
    assert job_records.index_members() == []


def test_a_job_whose_worker_keeps_dying_ends_in_error(own_redis, agent, settings):
    """No worker ever finishes the step (each one dies holding it): after RUN_MAX_STARTS
    starts the job ends in error, and the pass forgets it."""
    settings.RUN_MAX_STARTS = 2
    job_id = context_documents_add(agent=agent, documents=[{"text": "a"}])
    redis = scoped(agent.project.owner_id, agent.project_id)
    for _ in range(settings.RUN_MAX_STARTS):
        step = job_records.job_get(redis=redis, job_id=job_id)["step"]
        assert job_records.step_received(redis=redis, job_id=job_id, step=step, worker="gone#1")
        done = jobs_recover()
    job = job_records.job_get(redis=redis, job_id=job_id)
    assert job["status"] == "error" and "lost its worker" in job["error"], job
    assert done["failed"] == 1
    assert job_records.index_members() == []


def test_a_step_sent_again_leaves_the_old_message_nothing_to_do(own_redis, agent):
    """The step's first message comes back after the pass sent it again (a worker lost
    mid-batch gives it back after the visibility timeout): it stores nothing and sends
    no next batch, so the job never runs twice in parallel."""
    job_id = context_documents_add(agent=agent, documents=[{"text": "a"}, {"text": "b"}])
    project = agent.project
    redis = scoped(project.owner_id, project.id)
    old = job_records.job_get(redis=redis, job_id=job_id)["step"]
    assert job_records.step_received(redis=redis, job_id=job_id, step=old, worker="gone#1")
    assert jobs_recover()["redone"] == 1
    new = job_records.job_get(redis=redis, job_id=job_id)["step"]
    assert new != old
    ids = {"user_id": project.owner_id, "agent_id": str(agent.id), "job_id": job_id}
    assert context_job_add(project_id=project.id, start=0, step=old, **ids) is None
    job = job_records.job_get(redis=redis, job_id=job_id)
    assert job["status"] == "queued" and int(job.get("stored_documents", 0)) == 0
    assert job["step"] == new


def test_each_pass_looks_first_at_the_jobs_it_looked_at_longest_ago(own_redis, agent):
    """With more jobs in flight than a pass looks at, a lost one is still found."""
    jobs = [context_documents_add(agent=agent, documents=[{"text": t}]) for t in "ab"]
    redis = scoped(agent.project.owner_id, agent.project_id)
    for job_id in jobs:
        step = job_records.job_get(redis=redis, job_id=job_id)["step"]
        assert job_records.step_received(redis=redis, job_id=job_id, step=step, worker="gone#1")
    assert jobs_recover(limit=1)["redone"] == 1
    assert jobs_recover(limit=1)["redone"] == 1
    assert [job_records.job_get(redis=redis, job_id=j)["lost"] for j in jobs] == [1, 1]


def test_a_clear_given_back_late_clears_nothing(own_redis, agent):
    """A clear job is one step: its message coming back after the job ended (a worker
    lost after clearing, the broker giving the message back an hour later) does not
    clear what was added since."""
    job_id = context_clear_enqueue(agent=agent)
    redis = scoped(agent.project.owner_id, agent.project_id)
    step = job_records.job_get(redis=redis, job_id=job_id)["step"]
    ids = {"user_id": agent.project.owner_id, "agent_id": str(agent.id), "job_id": job_id}
    assert context_job_clear(project_id=agent.project_id, step=step, **ids) == {"status": "done"}
    assert job_records.index_members() == []  # ended: the pass forgets it
    put_context(agent)  # a document added since
    assert context_job_clear(project_id=agent.project_id, step=step, **ids) == {"status": "done"}
    assert context_count(agent) == 1


def test_a_job_the_bus_refused_leaves_nothing_for_the_pass(own_redis, agent):
    """The request that failed to put the job on the bus answered an error: the pass must
    not run the job later."""
    project_tombstone(agent.project_id)  # the bus refuses the project's tasks
    with pytest.raises(ProjectGone):
        context_documents_add(agent=agent, documents=[{"text": "a"}])
    redis = scoped(agent.project.owner_id, agent.project_id)
    assert job_records.index_members() == []
    assert list(redis.scan_iter("context_job*")) == []
