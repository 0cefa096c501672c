"""Quotas: a message past a limit is refused with a 429 naming the limit and its reset,
before anything is stored or any provider called; concurrent messages cannot overshoot
a budget by more than one run; the counters are rebuilt from the database when Redis
loses them."""

from __future__ import annotations

import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest
from django.db import connection
from django.utils import timezone
from rest_framework.test import APIClient

from chat.models import Message, Run
from common.redis import get_redis
from governance.models import Quota, RunUsage
from governance.quotas import quota_delete, quota_save
from governance.usage import usage_meter_start, usage_record, usage_run_ended
from tests.factories import AgentFactory, ChatSessionFactory, MessageFactory, ProjectFactory
from tests.governance.conftest import messages_url, wait_answered
from tests.redis_server import private_redis
from tests.runtime.conftest import token_for


def post(api, session, content="Hello?"):
    return api.post(messages_url(session), {"content": content}, format="json")


def next_midnight():
    now = timezone.now()
    return datetime(now.year, now.month, now.day, tzinfo=UTC) + timedelta(days=1)


@pytest.mark.slow
def test_a_quota_reached_mid_day_refuses_the_next_run_before_the_provider(
    live_worker, api, user, project, fake_openai
):
    Quota.objects.create(project=project, tokens_per_day=20)
    session = ChatSessionFactory(agent=AgentFactory(project=project, model="gpt-test"))
    first = post(api, session)
    assert first.status_code == 202
    assert wait_answered(first.json()["assistant_message_id"]).status == "done"
    calls, messages = len(fake_openai.requests), Message.objects.count()
    # The answered run left the in-flight sets of both scopes.
    redis = get_redis()
    assert redis.zcard(f"gov:p:{project.id}:runs") == 0 == redis.zcard(f"gov:u:{user.id}:runs")

    refused = post(api, session)
    assert refused.status_code == 429, refused.content
    body = refused.json()
    assert body["code"] == "quota_exceeded" and body["limit"] == "tokens_per_day"
    assert body["scope"] == "project" and body["limit_value"] == 20 and body["used"] == 26
    assert body["resets_at"] == next_midnight().isoformat()
    assert "tokens_per_day" in body["detail"]
    assert 0 < int(refused["Retry-After"]) <= 86401
    # Nothing stored, nothing run, no provider called.
    assert Message.objects.count() == messages and Run.objects.count() == 1
    assert len(fake_openai.requests) == calls

    quota = Quota.objects.get(project=project)
    quota.tokens_per_day = None
    quota_save(quota=quota)
    assert post(api, session).status_code == 202  # lifted: accepted again


@pytest.mark.slow
def test_concurrent_messages_racing_a_quota_overshoot_by_at_most_one_run(
    live_worker, user, project, fake_openai, settings
):
    """The stub's run costs 26 tokens; each run in flight holds 30 of the budget."""
    settings.QUOTA_RUN_RESERVE_TOKENS = 30
    limit = 100
    Quota.objects.create(project=project, tokens_per_day=limit)
    session = ChatSessionFactory(agent=AgentFactory(project=project, model="gpt-test"))
    token = token_for(user)
    start = threading.Barrier(12)

    def send(_):
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Token {token}")
        start.wait()
        try:
            return post(client, session).status_code
        finally:
            connection.close()

    # Waves of 12 at once, each after the last settled, until one is refused entirely.
    for _ in range(6):
        with ThreadPoolExecutor(12) as pool:
            codes = list(pool.map(send, range(12)))
        assert set(codes) <= {202, 429} and 429 in codes, codes
        for run in Run.objects.all():
            wait_answered(run.message_id)
        if 202 not in codes:
            break
    assert 202 not in codes
    spent = sum(RunUsage.objects.values_list("total_tokens", flat=True))
    assert limit <= spent <= limit + 26, spent
    assert len(fake_openai.requests) == Run.objects.count() == RunUsage.objects.count()


@pytest.mark.django_db
def test_concurrent_runs_and_messages_per_minute(api, user, session):
    quota = Quota.objects.create(project=session.project, concurrent_runs=1)
    assert post(api, session).status_code == 202
    refused = post(api, session)
    assert refused.status_code == 429
    assert refused.json()["limit"] == "concurrent_runs" and refused.json()["resets_at"] is None
    # The run in flight ends (here: cancelled): its place is free again.
    cancel = api.post(f"/my/projects/{session.project_id}/chat/{session.id}/cancel/")
    assert cancel.status_code == 202
    assert post(api, session).status_code == 202

    quota_delete(quota=quota)
    quota_save(quota=Quota(user=user, messages_per_minute=3))  # the owner's, across projects
    other = ChatSessionFactory(agent=AgentFactory(project=ProjectFactory(owner=user)))
    # Three this minute already (two above are this user's; a minute may just have
    # turned: then fewer count, and more are accepted below).
    accepted = 0
    while True:
        response = post(api, other)
        if response.status_code == 429:
            break
        accepted += 1
        assert accepted <= 3
    assert response.json()["scope"] == "user"
    assert response.json()["limit"] == "messages_per_minute"


def _spent(project, tokens):
    now = timezone.now()
    RunUsage.objects.create(
        run_id=uuid.uuid4(),
        project_id=project.id,
        user_id=project.owner_id,
        agent_id=uuid.uuid4(),
        message_id=1,
        total_tokens=tokens,
        prompt_tokens=tokens,
        created_at=now,
        day=now.date(),
        recorded_at=now,
    )


@pytest.mark.django_db
def test_counters_are_rebuilt_from_the_database_after_redis_is_flushed(
    api, user, session, redis_client
):
    quota = Quota.objects.create(project=session.project, tokens_per_month=1000)
    assert post(api, session).status_code == 202  # the counters exist now
    assert list(redis_client.scan_iter(match="gov:*"))
    _spent(session.project, 600)  # recorded behind the counters' back

    redis_client.flushdb()
    quota.tokens_per_month = 600
    quota.save()  # behind the counters' back too: Redis lost them anyway
    refused = post(api, session)
    assert refused.status_code == 429 and refused.json()["limit"] == "tokens_per_month"
    # 600 recorded plus the first message's run, in flight: it holds its reserve.
    assert refused.json()["used"] == 600 + 1000

    # The runs in flight are rebuilt too.
    quota_delete(quota=quota)
    quota_save(quota=Quota(user=user, concurrent_runs=1))
    redis_client.flushdb()
    refused = post(api, session)
    assert refused.status_code == 429 and refused.json()["limit"] == "concurrent_runs"
    assert refused.json()["scope"] == "user"


@pytest.mark.django_db
def test_a_users_quota_counts_all_their_projects(api, user, session):
    Quota.objects.create(user=user, tokens_per_day=500)
    _spent(ProjectFactory(owner=user), 500)  # another project of the same user
    refused = post(api, session)
    assert refused.status_code == 429 and refused.json()["scope"] == "user"
    assert refused.json()["used"] == 500


@pytest.mark.django_db
def test_recorded_tokens_count_at_once_in_the_counters(api, session, settings):
    settings.QUOTA_RUN_RESERVE_TOKENS = 0
    Quota.objects.create(project=session.project, tokens_per_day=100)
    assert post(api, session).status_code == 202
    run = Run.objects.get()
    reported = SimpleNamespace(prompt_tokens=100, completion_tokens=50)
    meter = usage_meter_start(
        provider=SimpleNamespace(name="openai", usage=reported), model="m", messages=[]
    )
    ids = {"run_id": run.id, "project_id": session.project_id, "user_id": session.project.owner_id}
    assert usage_record(
        **ids,
        attempt=1,
        agent_id=session.agent_id,
        message_id=run.message_id,
        accepted_at=run.created_at,
        meter=meter,
        completion="",
        outcome="done",
    )
    usage_run_ended(**ids)
    assert RunUsage.objects.get(run_id=run.id).total_tokens == 150
    RunUsage.objects.filter(run_id=run.id).update(total_tokens=0)  # only Redis knows now
    refused = post(api, session)
    assert refused.status_code == 429 and refused.json()["used"] == 150


@pytest.mark.django_db
def test_the_owner_reads_the_quotas_and_others_get_404(api, other_api, user, session):
    Quota.objects.create(project=session.project, tokens_per_day=100, concurrent_runs=2)
    Quota.objects.create(user=user, tokens_per_month=5000)
    _spent(session.project, 40)
    assert post(api, session).status_code == 202  # a run in flight (no worker here)
    url = f"/my/projects/{session.project_id}/quotas/"
    body = api.get(url).json()
    project = {item["limit"]: item for item in body["project"]}
    assert project["tokens_per_day"]["value"] == 100 and project["tokens_per_day"]["used"] == 40
    assert project["tokens_per_day"]["resets_at"] == next_midnight().isoformat().replace(
        "+00:00", "Z"
    )
    assert project["concurrent_runs"] == {
        "limit": "concurrent_runs",
        "value": 2,
        "used": 1,
        "resets_at": None,
    }
    assert project["messages_per_minute"]["value"] is None
    user_limits = {item["limit"]: item["value"] for item in body["user"]}
    assert user_limits["tokens_per_month"] == 5000 and user_limits["tokens_per_day"] is None
    assert other_api.get(url).status_code == 404


@pytest.mark.django_db(transaction=True)
def test_with_redis_down_a_quota_refuses_with_503_and_writes_nothing(api, user, settings):
    """Checked against the database alone, parallel messages overshoot a quota: refused
    until Redis is back, rather than admitted past it."""
    with private_redis() as server:
        settings.REDIS_URL = settings.CELERY_BROKER_URL = server.url
        session = ChatSessionFactory(agent=AgentFactory(project=ProjectFactory(owner=user)))
        Quota.objects.create(project=session.project, concurrent_runs=1)
        server.stop()
        refused = post(api, session)
        assert refused.status_code == 503 and int(refused["Retry-After"]) > 0
        assert Run.objects.count() == 0
        server.start()
        assert post(api, session).status_code == 202  # back: admitted again


@pytest.mark.django_db
def test_regenerate_is_admitted_as_a_message_is(api, session):
    """Answering again starts a run: past a quota it is refused and nothing changes."""
    answered = ChatSessionFactory(agent=session.agent, project=session.project)
    MessageFactory(session=answered, role="user", content="Hello?")
    last = MessageFactory(session=answered, role="assistant", content="Hi.", status="done")
    Quota.objects.create(project=session.project, concurrent_runs=1)
    assert post(api, session).status_code == 202  # in flight: the one place is taken
    runs = Run.objects.count()

    url = f"/my/projects/{session.project_id}/chat/{answered.id}/regenerate/"
    refused = api.post(url)
    assert refused.status_code == 429, refused.content
    assert refused.json()["limit"] == "concurrent_runs"
    last.refresh_from_db()
    assert last.status == "done" and Run.objects.count() == runs
