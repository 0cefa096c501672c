"""Idempotency-Key on the POSTs that create work: a retry answers the first response and
creates nothing; another body under the key is a 422; concurrent duplicates make one."""

from __future__ import annotations

import threading
import uuid

import pytest
from django.db import connection
from rest_framework.test import APIClient

from chat.models import Message, Run
from chat.state import run_end
from projects.models import IdempotencyKey
from tests.conftest import _client_for

pytestmark = pytest.mark.django_db(transaction=True)


def _messages_url(session) -> str:
    return f"/my/projects/{session.project_id}/chat/{session.id}/messages/"


def test_a_retry_answers_the_first_response_and_creates_nothing(api, session):
    first = api.post(
        _messages_url(session), {"content": "hello"}, format="json", HTTP_IDEMPOTENCY_KEY="k-1"
    )
    assert first.status_code == 202, first.content
    again = api.post(
        _messages_url(session), {"content": "hello"}, format="json", HTTP_IDEMPOTENCY_KEY="k-1"
    )
    assert again.status_code == 202
    assert again.json() == first.json()
    assert again["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first
    assert Message.objects.filter(session=session, role="user").count() == 1
    assert Run.objects.filter(session=session).count() == 1
    # Another key is another message.
    other = api.post(
        _messages_url(session), {"content": "hello"}, format="json", HTTP_IDEMPOTENCY_KEY="k-2"
    )
    assert other.status_code == 202
    assert other.json()["id"] != first.json()["id"]
    assert Run.objects.filter(session=session).count() == 2


def test_the_same_key_with_another_body_is_a_422_and_writes_nothing(api, session):
    url = _messages_url(session)
    first = api.post(url, {"content": "a"}, format="json", HTTP_IDEMPOTENCY_KEY="k")
    assert first.status_code == 202
    response = api.post(url, {"content": "b"}, format="json", HTTP_IDEMPOTENCY_KEY="k")
    assert response.status_code == 422, response.content
    assert response.json()["code"] == "idempotency_key_reused"
    assert Message.objects.filter(session=session, role="user").count() == 1
    # Key order and spacing of the JSON do not make another request.
    same = api.post(url, data='{ "content" : "a" }', content_type="application/json",
                    HTTP_IDEMPOTENCY_KEY="k")  # fmt: skip
    assert same.status_code == 202 and same["Idempotent-Replayed"] == "true"


def test_a_key_on_another_route_is_another_request(api, session):
    api.post(_messages_url(session), {"content": "a"}, format="json", HTTP_IDEMPOTENCY_KEY="k")
    url = f"/my/projects/{session.project_id}/chat/{session.id}/regenerate/"
    response = api.post(url, HTTP_IDEMPOTENCY_KEY="k")
    assert response.status_code == 422


def test_a_failed_request_leaves_its_key_free(api, session):
    url = _messages_url(session)
    bad = api.post(url, {"content": ""}, format="json", HTTP_IDEMPOTENCY_KEY="k")
    assert bad.status_code == 400
    assert not IdempotencyKey.objects.exists()
    good = api.post(url, {"content": "fixed"}, format="json", HTTP_IDEMPOTENCY_KEY="k")
    assert good.status_code == 202


@pytest.mark.parametrize("key", ["", "a b", "x" * 256, "é"])
def test_a_malformed_key_is_a_400_and_writes_nothing(api, session, key):
    response = api.post(
        _messages_url(session), {"content": "hi"}, format="json", HTTP_IDEMPOTENCY_KEY=key
    )
    assert response.status_code == 400, response.content
    assert "Idempotency-Key" in response.json()
    assert not Message.objects.exists()
    assert not IdempotencyKey.objects.exists()


def test_keys_are_per_user_and_project(api, other_api, session, other_user):
    # Another user's project is a 404 whatever the key.
    response = other_api.post(
        _messages_url(session), {"content": "hi"}, format="json", HTTP_IDEMPOTENCY_KEY="k"
    )
    assert response.status_code == 404
    assert not IdempotencyKey.objects.exists()


def test_regenerate_and_context_jobs_take_the_key(api, session):
    api.post(_messages_url(session), {"content": "q"}, format="json")
    run = Run.objects.get(session=session)
    Run.objects.filter(id=run.id).update(status=Run.Status.RUNNING)
    run_end(run=run, status=Run.Status.DONE, content="answer")
    url = f"/my/projects/{session.project_id}/chat/{session.id}/regenerate/"
    first = api.post(url, HTTP_IDEMPOTENCY_KEY="regen-1")
    assert first.status_code == 202, first.content
    again = api.post(url, HTTP_IDEMPOTENCY_KEY="regen-1")
    assert again.status_code == 202 and again.json() == first.json()
    assert Run.objects.filter(session=session).count() == 2

    ctx = f"/my/projects/{session.project_id}/agents/{session.agent_id}/context/"
    body = {"documents": ["a document"]}
    one = api.post(ctx, body, format="json", HTTP_IDEMPOTENCY_KEY="ctx-1")
    assert one.status_code == 202, one.content
    two = api.post(ctx, body, format="json", HTTP_IDEMPOTENCY_KEY="ctx-1")
    assert two.status_code == 202 and two.json()["job_id"] == one.json()["job_id"]


@pytest.mark.skipif("connection.vendor != 'postgresql'", reason="concurrency needs PostgreSQL")
def test_fifty_concurrent_posts_with_one_key_make_one_message_and_one_run(user, session):
    url = _messages_url(session)
    key = str(uuid.uuid4())
    clients = [_client_for(user) for _ in range(50)]
    start = threading.Barrier(50)
    answers: list = [None] * 50

    def post(i: int, client: APIClient) -> None:
        start.wait()
        try:
            answers[i] = client.post(
                url, {"content": "once"}, format="json", HTTP_IDEMPOTENCY_KEY=key
            )
        finally:
            connection.close()

    threads = [threading.Thread(target=post, args=(i, c)) for i, c in enumerate(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    codes = sorted(a.status_code for a in answers)
    print("status codes of the 50:", {c: codes.count(c) for c in set(codes)})
    # 409: the key's first request was still working; 503: no pooled database connection
    # within DB_POOL_TIMEOUT_SECONDS (50 threads share this process's pool; nothing written).
    assert set(codes) <= {202, 409, 503}, codes
    assert 202 in codes
    assert Message.objects.filter(session=session, role="user").count() == 1
    assert Run.objects.filter(session=session).count() == 1
    accepted = {a.json()["id"] for a in answers if a.status_code == 202}
    assert len(accepted) == 1  # every 202 (first or replayed) names the one message
    busy = [a for a in answers if a.status_code == 409]
    assert all(a.json()["code"] == "idempotency_key_in_use" for a in busy)
    unavailable = [a for a in answers if a.status_code == 503]
    assert all(a.json()["code"] == "backend_unavailable" for a in unavailable)
    assert all(a["Retry-After"] == "1" for a in busy)
    # Retried after the first finished, every one gets the first answer.
    again = _client_for(user).post(url, {"content": "once"}, format="json",
                                   HTTP_IDEMPOTENCY_KEY=key)  # fmt: skip
    assert again.status_code == 202 and again.json()["id"] in accepted


def test_the_schema_documents_the_header(api):
    schema = api.get("/api/schema/", HTTP_ACCEPT="application/json").json()
    for path, method in [
        ("/my/projects/{project_id}/chat/{session_id}/messages/", "post"),
        ("/my/projects/{project_id}/chat/{session_id}/regenerate/", "post"),
        ("/my/projects/{project_id}/agents/{agent_id}/context/", "post"),
        ("/my/projects/{project_id}/schedules/", "post"),
    ]:
        operation = schema["paths"][path][method]
        names = [p["name"] for p in operation.get("parameters", [])]
        assert "Idempotency-Key" in names, path
        assert "422" in operation["responses"], path
    assert "Idempotency-Key" not in str(schema["paths"]["/my/projects/{project_id}/agents/"])
