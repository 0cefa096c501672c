"""With Redis stopped, what only reads the database still answers: the database is the
source of truth, and the workspace is touched only where work needs it. A Redis that
answers but refuses writes (full, read-only) is unhealthy in the operators' health."""

from __future__ import annotations

import logging
import threading
import time

import pytest
import redis
from django.db import connection
from rest_framework.test import APIClient

from agents.models import Agent
from chat.models import Message, Run
from chat.tasks import run_agent
from governance.models import Quota
from tests.factories import (
    AgentFactory,
    ChatSessionFactory,
    MessageFactory,
    ProjectFactory,
    UserFactory,
)
from tests.redis_server import private_redis
from tests.workers import broker_at, wait_until
from workspaces.manager import get_worker_space, get_worker_space_manager

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def stoppable_redis(settings):
    """A Redis of this test's own, used for everything (registry, streams, broker)."""
    with private_redis() as server, broker_at(server.url):
        settings.REDIS_URL = settings.CELERY_BROKER_URL = server.url
        yield server


def test_pure_reads_answer_200_with_redis_stopped(api, user, stoppable_redis):
    project = ProjectFactory(owner=user)
    agent = AgentFactory(project=project)
    session = ChatSessionFactory(agent=agent, project=project)
    MessageFactory(session=session)
    get_worker_space(user_id=user.pk, project_id=project.id)  # a workspace existed

    stoppable_redis.stop()
    get_worker_space_manager().forget_all_unsafe()  # as a web process that holds none

    base = f"/my/projects/{project.id}"
    for path in (
        "/my/projects/",
        f"{base}/",
        f"{base}/agents/",
        f"{base}/agents/{agent.id}/",
        f"{base}/chat/",
        f"{base}/chat/{session.id}/",
        f"{base}/chat/{session.id}/messages/",
    ):
        response = api.get(path)
        assert response.status_code == 200, (path, response.content)


def test_an_agent_write_with_redis_stopped_commits_and_the_cache_heals(
    api, user, stoppable_redis, settings
):
    project = ProjectFactory(owner=user)
    space = get_worker_space(user_id=user.pk, project_id=project.id)
    stoppable_redis.stop()

    response = api.post(f"/my/projects/{project.id}/agents/", {"name": "late"}, format="json")

    # Committed; the after-commit cache update failed quietly (logged), never a 500.
    assert response.status_code == 201, response.content
    agent_id = response.json()["id"]
    assert Agent.objects.filter(id=agent_id).exists()

    stoppable_redis.start()  # back, and empty
    space.revalidate_at = 0
    space = get_worker_space(user_id=user.pk, project_id=project.id)
    assert space.agent_cache.peek(agent_id)["name"] == "late"


def test_writes_with_redis_stopped_answer_without_500(api, user, stoppable_redis):
    """Writes that only need Redis after commit succeed; those that need it before
    (context jobs and searches live in Redis) are a clear 503 and write nothing."""
    project = ProjectFactory(owner=user)
    agent = AgentFactory(project=project)
    doomed = AgentFactory(project=project)
    session = ChatSessionFactory(agent=agent, project=project)
    other = ChatSessionFactory(agent=agent, project=project)
    base = f"/my/projects/{project.id}"
    stoppable_redis.stop()

    assert (
        api.patch(f"{base}/agents/{agent.id}/", {"model": "m2"}, format="json").status_code == 200
    )
    started = time.monotonic()
    assert api.delete(f"{base}/agents/{doomed.id}/").status_code == 204
    # Its publish after commit (the agent's collection to drop) fails within a second,
    # as kombu's connection retries no longer hold the request for six.
    assert time.monotonic() - started < 3
    assert api.delete(f"{base}/chat/{other.id}/").status_code == 204
    posted = api.post(f"{base}/chat/{session.id}/messages/", {"content": "hi"}, format="json")
    assert posted.status_code == 202
    assert Run.objects.get(message_id=posted.json()["assistant_message_id"]).status == "queued"
    assert api.post(f"{base}/chat/{session.id}/cancel/").json()["cancelled"] == [
        posted.json()["assistant_message_id"]
    ]

    for response in (
        api.post(f"{base}/agents/{agent.id}/context/", {"documents": ["x"]}, format="json"),
        api.get(f"{base}/agents/{agent.id}/context/", {"q": "x"}),
    ):
        assert response.status_code == 503, response.content
        assert response["Retry-After"] and "detail" in response.json()


def test_with_redis_stopped_a_quota_refuses_with_503_rather_than_overshoot(
    api, user, stoppable_redis
):
    """Quotas cannot be checked atomically without Redis: a project with a quota is
    refused (503, Retry-After, nothing written) instead of admitting parallel messages
    past its limit; a project without one is not held up."""
    limited, free = ProjectFactory(owner=user), ProjectFactory(owner=user)
    Quota.objects.create(project=limited, messages_per_minute=5)
    sessions = {
        p.id: ChatSessionFactory(agent=AgentFactory(project=p), project=p) for p in (limited, free)
    }
    stoppable_redis.stop()

    session = sessions[limited.id]
    url = f"/my/projects/{limited.id}/chat/{session.id}/messages/"
    for _ in range(3):
        response = api.post(url, {"content": "hi"}, format="json")
        assert response.status_code == 503, response.content
        assert int(response["Retry-After"]) > 0 and "Quotas" in response.json()["detail"]
    assert not Run.objects.filter(session__project=limited).exists()

    session = sessions[free.id]
    url = f"/my/projects/{free.id}/chat/{session.id}/messages/"
    assert api.post(url, {"content": "hi"}, format="json").status_code == 202


def _fill(client: redis.Redis) -> None:
    """Leave `maxmemory` a little above what it holds, under `noeviction`, and write
    until it refuses even the smallest write."""
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", int(client.info("memory")["used_memory"]) + 2_000_000)
    for size in (100_000, 1_000, 10):
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            for i in range(10_000):
                client.set(f"filler:{size}:{i}", "x" * size)


def _read_only(client: redis.Redis) -> None:
    """A replica of a primary that does not answer (as after a failover that pointed
    the clients at the old primary): reads answer, writes are refused."""
    client.execute_command("REPLICAOF", "127.0.0.1", "1")


@pytest.mark.parametrize("refuse", [_fill, _read_only], ids=["full", "read-only"])
def test_a_redis_that_answers_but_refuses_writes_is_unhealthy(user, stoppable_redis, refuse):
    """Such a Redis still answers PING: every write of the web and the workers fails,
    while a health check that pinged called it healthy."""
    staff = APIClient()
    staff.force_authenticate(UserFactory(is_staff=True))
    assert staff.get("/admin/workspaces/health").json()["checks"]["redis"]["healthy"] is True
    client = stoppable_redis.client()

    refuse(client)
    assert client.ping()
    response = staff.get("/admin/workspaces/health")
    checks = response.json()["checks"]
    assert response.status_code == 503
    for name in ("redis", "broker"):  # one Redis here
        assert checks[name]["healthy"] is False, checks[name]
        assert ("maxmemory" in checks[name]["error"]) or ("read only" in checks[name]["error"])

    # Room again (FLUSHDB would free it in the background, a moment later), or a primary.
    if refuse is _fill:
        client.config_set("maxmemory", 0)
    else:
        client.execute_command("REPLICAOF", "NO", "ONE")
    assert staff.get("/admin/workspaces/health").json()["checks"]["redis"]["healthy"] is True


def test_a_redis_that_would_evict_keys_is_named_in_degraded(stoppable_redis):
    """At `maxmemory` an evicting policy deletes keys, queued messages among them, and
    one that does not refuses writes: working now, so healthy, with a warning that puts
    it in `degraded`."""
    staff = APIClient()
    staff.force_authenticate(UserFactory(is_staff=True))
    stoppable_redis.client().config_set("maxmemory", 512 * 2**20)
    stoppable_redis.client().config_set("maxmemory-policy", "allkeys-lru")

    body = staff.get("/admin/workspaces/health").json()
    redis_check = body["checks"]["redis"]
    assert redis_check["healthy"] is True and "allkeys-lru" in redis_check["warning"]
    assert redis_check["maxmemory_mb"] == 512 and redis_check["maxmemory_policy"] == "allkeys-lru"
    assert "redis" in body["degraded"]

    client = stoppable_redis.client()
    client.config_set("maxmemory-policy", "noeviction")
    body = staff.get("/admin/workspaces/health").json()
    assert "warning" not in body["checks"]["redis"] and "redis" not in body["degraded"]

    # Under noeviction, close to maxmemory: a warning before writes are refused.
    client.config_set("maxmemory", int(int(client.info("memory")["used_memory"]) * 1.05))
    body = staff.get("/admin/workspaces/health").json()
    assert "of maxmemory used" in body["checks"]["redis"]["warning"]
    assert body["checks"]["redis"]["healthy"] is True and "redis" in body["degraded"]


def test_a_redis_that_stalls_holds_a_request_one_socket_timeout_per_command(
    api, user, stoppable_redis, settings
):
    """A Redis that accepts connections but answers nothing (a slow command, a host gone
    without a reset; here CLIENT PAUSE) holds a request REDIS_SOCKET_TIMEOUT_SECONDS
    (1 s here) per command, then the request goes on without it: a chat message is
    accepted (its run sent by the recovery pass), health says Redis is unhealthy. The
    pause outlasts both: without the timeout they would wait for its end."""
    settings.REDIS_SOCKET_TIMEOUT_SECONDS = 1
    project = ProjectFactory(owner=user)
    session = ChatSessionFactory(agent=AgentFactory(project=project), project=project)
    url = f"/my/projects/{project.id}/chat/{session.id}/messages/"
    assert api.post(url, {"content": "hi"}, format="json").status_code == 202
    staff = APIClient()
    staff.force_authenticate(UserFactory(is_staff=True))
    client = stoppable_redis.client()

    # Paused for longer than the request and the health check take together (about 3 s
    # each: three commands, and the redis, broker and workers checks on this one Redis;
    # the bounds leave room for a busy machine, and the pause for both bounds).
    client.execute_command("CLIENT", "PAUSE", 30_000, "ALL")
    started = time.monotonic()
    posted = api.post(url, {"content": "again"}, format="json")
    took = time.monotonic() - started
    started = time.monotonic()
    redis_check = staff.get("/admin/workspaces/health").json()["checks"]["redis"]
    health_took = time.monotonic() - started
    assert posted.status_code == 202 and took < 10, (posted.content, took)
    assert redis_check["healthy"] is False and "Timeout" in redis_check["error"], redis_check
    assert health_took < 10, health_took
    assert Run.objects.get(message_id=posted.json()["assistant_message_id"]).status == "queued"


def test_a_run_task_that_cannot_reach_redis_waits_for_it_and_then_answers(
    api, user, stoppable_redis, caplog
):
    """A worker that holds a run's task when Redis goes out of reach (down, or this host
    cut off) keeps it until Redis answers, then answers the run. The run's mark names
    this worker, and the recovery pass leaves a live worker's runs to it: a task failed
    there would have left the run to no one."""
    project = ProjectFactory(owner=user)
    session = ChatSessionFactory(agent=AgentFactory(project=project), project=project)
    url = f"/my/projects/{project.id}/chat/{session.id}/messages/"
    answer_id = api.post(url, {"content": "hi"}, format="json").json()["assistant_message_id"]
    run = Run.objects.get(message_id=answer_id)
    stoppable_redis.stop()

    outcome: list = []

    def task() -> None:  # as the worker calls it: the project guard first, then the run
        kwargs = {"user_id": user.pk, "project_id": str(project.id)}
        try:
            outcome.append(run_agent(**kwargs, run_id=str(run.id), attempt=run.attempt))
        except Exception as exc:
            outcome.append(exc)
        finally:
            connection.close()

    waiting = threading.Thread(target=task, daemon=True)  # never holds the session open
    with caplog.at_level(logging.WARNING, logger="common.lifecycle"):
        waiting.start()
        wait_until(
            lambda: outcome or "trying again" in caplog.text, timeout=10, what="the task waits"
        )
        assert not outcome, outcome  # not failed
        stoppable_redis.start()  # back, and empty
        waiting.join(30)
    assert outcome == ["done"]
    assert Message.objects.get(id=answer_id).status == "done"
