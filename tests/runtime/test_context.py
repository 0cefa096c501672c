"""The agent context API: documents in (202 + job), search (through a worker), clear."""

from __future__ import annotations

import time
import uuid

import pytest

from context.jobs import context_search_reply
from tests.factories import AgentFactory, ProjectFactory
from tests.runtime.conftest import queued_task_names
from tests.workers import wait_until
from workspaces.redis import workspace_prefix


def context_url(agent, agent_id=None):
    return f"/my/projects/{agent.project_id}/agents/{agent_id or agent.id}/context/"


def run_job(api, agent, response):
    assert response.status_code == 202, response.content
    body = response.json()
    assert body["status"] == "queued" and uuid.UUID(body["job_id"])
    url = f"{context_url(agent)}jobs/{body['job_id']}/"

    def finished():
        job = api.get(url).json()
        return job if job["status"] in ("done", "error") else None

    return wait_until(finished, timeout=60, what="context job")


def search(api, agent, q, k=5):
    response = api.get(context_url(agent), {"q": q, "k": k})
    assert response.status_code == 200, response.content
    return response.json()["results"]


@pytest.mark.slow
def test_add_search_clear(live_worker, api, agent):
    documents = [
        "Кошку в офисе зовут Барсик, она спит на серверной стойке.",
        "Счета оплачиваются пятого числа каждого месяца.",
        {"text": "The VPN password rotates every 90 days.", "metadata": {"source": "it-wiki"}},
        "Обед в столовой с 13:00 до 14:00.",
    ]
    job = run_job(api, agent, api.post(context_url(agent), {"documents": documents}, format="json"))
    assert job["status"] == "done" and job["documents"] == 4 and job["chunks"] == 4
    assert job["kind"] == "add" and job["agent_id"] == str(agent.id)

    # Multilingual retrieval: a Russian question finds the Russian answer first.
    hits = search(api, agent, "Когда нужно платить по счетам?", k=2)
    assert len(hits) == 2 and "пятого числа" in hits[0]["text"]
    assert hits[0]["score"] >= hits[1]["score"]
    hits = search(api, agent, "how often does the VPN password change", k=1)
    assert hits[0]["metadata"] == {"source": "it-wiki"} and hits[0]["kind"] == "document"

    # Adding the same documents again stores nothing new (points are named by content).
    run_job(api, agent, api.post(context_url(agent), {"documents": documents}, format="json"))
    assert len(search(api, agent, "офис", k=50)) == 4

    job = run_job(api, agent, api.delete(context_url(agent)))
    assert job["status"] == "done" and job["kind"] == "clear"
    assert search(api, agent, "Барсик") == []


@pytest.mark.slow
def test_long_documents_are_chunked(live_worker, api, agent):
    paragraphs = [
        f"Paragraph {i} talks about topic number {i} in some detail." * 8 for i in range(12)
    ]
    job = run_job(
        api,
        agent,
        api.post(context_url(agent), {"documents": ["\n\n".join(paragraphs)]}, format="json"),
    )
    assert job["status"] == "done" and job["chunks"] > 3


@pytest.mark.slow
def test_search_of_an_agent_without_context_is_empty(live_worker, api, agent):
    assert search(api, agent, "anything at all") == []


BIG = "x" * (32 * 1024 + 1)


@pytest.mark.parametrize(
    "payload",
    [
        {},
        {"documents": []},
        {"documents": "just a string"},
        {"documents": [""]},
        {"documents": ["   "]},
        {"documents": [1]},
        {"documents": [{"text": 5}]},
        {"documents": [{"body": "no text key"}]},
        {"documents": [{"text": "a", "extra": 1}]},
        {"documents": [{"text": "a", "metadata": "not an object"}]},
        {"documents": [{"text": "a", "metadata": {"k": "v" * 3000}}]},
        {"documents": [BIG]},
        {"documents": ["doc"] * 101},
        {"documents": ["y" * 30000] * 40},  # each fits, together over 1 MB
        {"documents": ["ok"], "agent_id": "other"},
    ],
)
def test_bad_documents_are_400_and_queue_nothing(db, api, agent, redis_client, payload):
    response = api.post(context_url(agent), payload, format="json")
    assert response.status_code == 400, response.content
    assert response.json()  # says what is wrong
    assert "agents.add_context" not in queued_task_names(agent.project_id)
    prefix = workspace_prefix(agent.project.owner_id, agent.project_id)
    assert not list(redis_client.scan_iter(match=prefix + "context_job:*"))


def test_a_good_document_does_queue_a_job(db, api, agent, redis_client):
    """The counterpart of the test above: the same checks see a valid request's work."""
    response = api.post(context_url(agent), {"documents": ["fine"]}, format="json")
    assert response.status_code == 202
    assert "agents.add_context" in queued_task_names(agent.project_id)
    prefix = workspace_prefix(agent.project.owner_id, agent.project_id)
    assert len(list(redis_client.scan_iter(match=prefix + "context_job:*"))) == 1


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"q": ""},
        {"q": "a", "k": 0},
        {"q": "a", "k": 51},
        {"q": "a", "k": "x"},
        {"q": "a" * 1001},
    ],
)
def test_bad_search_is_400_and_queues_nothing(db, api, agent, params):
    response = api.get(context_url(agent), params)
    assert response.status_code == 400, response.content
    assert "agents.search_context" not in queued_task_names(agent.project_id)


def test_search_without_a_worker_answers_503_and_the_late_task_gives_up(
    db, api, agent, runtime_settings, redis_client
):
    runtime_settings.CONTEXT_SEARCH_TIMEOUT_SECONDS = 0.3
    started = time.monotonic()
    response = api.get(context_url(agent), {"q": "hello"})
    assert response.status_code == 503 and "no worker answered" in response.json()["detail"]
    assert time.monotonic() - started < 3
    assert queued_task_names(agent.project_id).count("agents.search_context") == 1
    # The task a worker picks up later finds nobody waiting and does nothing.
    outcome = context_search_reply(
        user_id=agent.project.owner_id,
        project_id=agent.project_id,
        agent_id=str(agent.id),
        request_id=str(uuid.uuid4()),
        query="hello",
        k=3,
        deadline=time.time() - 1,
    )
    assert outcome == "expired"
    prefix = workspace_prefix(agent.project.owner_id, agent.project_id)
    assert not list(redis_client.scan_iter(match=prefix + "reply:*"))


def test_jobs_are_visible_only_through_their_agent(db, api, agent, user):
    job_id = api.post(context_url(agent), {"documents": ["a"]}, format="json").json()["job_id"]
    assert api.get(f"{context_url(agent)}jobs/{job_id}/").status_code == 200
    sibling = AgentFactory(project=agent.project)
    assert api.get(f"{context_url(sibling)}jobs/{job_id}/").status_code == 404
    assert api.get(f"{context_url(agent)}jobs/{uuid.uuid4()}/").status_code == 404


def test_foreign_agents_context_is_404_everywhere(db, api, other_user, redis_client, user):
    theirs = AgentFactory(project=ProjectFactory(owner=other_user))
    mine = AgentFactory(project=ProjectFactory(owner=user))
    for url in (
        context_url(theirs),  # their project
        f"/my/projects/{mine.project_id}/agents/{theirs.id}/context/",  # their agent in mine
    ):
        assert api.post(url, {"documents": ["x"]}, format="json").status_code == 404
        assert api.get(url, {"q": "x"}).status_code == 404
        assert api.delete(url).status_code == 404
        assert api.get(f"{url}jobs/{uuid.uuid4()}/").status_code == 404
    for name in ("agents.add_context", "agents.search_context", "agents.clear_context"):
        assert name not in queued_task_names(theirs.project_id)
        assert name not in queued_task_names(mine.project_id)
    assert not list(redis_client.scan_iter(match=f"uws:*:{theirs.project_id.hex}:*"))
