"""One worker process runs many agent runs at once, and one project's bulk work does not
hold up another project's chat (real worker threads, Redis, Qdrant local mode, the
bundled embedder, and the OpenAI-protocol server for a model that takes its time)."""

from __future__ import annotations

import pytest

from chat.models import Message, Run
from tests.factories import AgentFactory, ChatSessionFactory, ProjectFactory
from tests.workers import shared_pool_worker, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture
def wide_worker(transactional_db):
    """The shared pool's worker with room for several runs at once, as the Procfile runs
    it (threads), narrower."""
    with shared_pool_worker(concurrency=8) as worker:
        yield worker


def post(api, session, content: str) -> int:
    url = f"/my/projects/{session.project_id}/chat/{session.id}/messages/"
    response = api.post(url, {"content": content}, format="json")
    assert response.status_code == 202, response.content
    return response.json()["assistant_message_id"]


def test_runs_waiting_on_the_model_overlap(wide_worker, api, user, fake_openai):
    fake_openai.mode, fake_openai.delay = "slow", 0.5  # each answer takes about 2 s
    project = ProjectFactory(owner=user)
    agent = AgentFactory(project=project, model="test-model")
    sessions = [ChatSessionFactory(project=project, agent=agent) for _ in range(6)]
    answers = [post(api, session, "hello") for session in sessions]

    def finished():
        runs = list(Run.objects.filter(message_id__in=answers))
        return runs if all(r.status in Run.FINISHED for r in runs) else None

    runs = wait_until(finished, timeout=60, interval=0.2, what="every run")
    assert {r.status for r in runs} == {Run.Status.DONE}
    # Each started before the first of them finished: they waited on the model together.
    assert max(r.started_at for r in runs) < min(r.finished_at for r in runs)


def test_a_bulk_ingest_does_not_hold_up_another_projects_chat(
    wide_worker, api, user, runtime_settings
):
    runtime_settings.INGEST_BATCH_DOCUMENTS = batch = 8
    bulk = AgentFactory(project=ProjectFactory(owner=user))
    chat = ChatSessionFactory(agent=AgentFactory(project=ProjectFactory(owner=user)))
    context = f"/my/projects/{bulk.project_id}/agents/{bulk.id}/context/"

    def ingest(count: int) -> str:
        text = "a paragraph about the product. " * 20
        documents = [f"Document {i}: {text}" for i in range(count)]
        response = api.post(context, {"documents": documents}, format="json")
        assert response.status_code == 202, response.content
        return response.json()["job_id"]

    def job(job_id: str) -> dict:
        return api.get(f"{context}jobs/{job_id}/").json()

    def answered(message_id: int) -> bool:
        return Message.objects.get(id=message_id).status in Message.FINISHED

    # Warm: both projects' workspaces and queues, and both embedding engines.
    warm = ingest(1)
    wait_until(lambda: job(warm)["status"] == "done", timeout=120, what="warm-up ingest")
    warm_answer = post(api, chat, "warm up")
    wait_until(lambda: answered(warm_answer), timeout=60, what="warm-up chat")

    bulk_job = ingest(10 * batch)
    wait_until(lambda: job(bulk_job).get("stored_documents", 0) >= batch, what="bulk under way")
    before = job(bulk_job).get("stored_documents", 0)
    answer = post(api, chat, "When is support open?")
    wait_until(lambda: answered(answer), timeout=60, what="the chat answer")
    after = job(bulk_job)

    message = Message.objects.get(id=answer)
    assert message.status == Message.Status.DONE, message.error
    # Answered while the bulk ingest went on, and it waited for no more than a couple of
    # its batches (the one being stored, and one the worker had already taken).
    assert after["status"] != "done", after
    assert after.get("stored_documents", 0) - before <= 3 * batch, (before, after)
