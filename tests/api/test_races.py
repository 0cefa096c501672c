"""Two requests at once where one deletes what the other writes to (a project, an
agent, a webhook endpoint): the write that lost is a 404 and changes nothing, the delete
takes everything the winner added, and neither answers 500. Real PostgreSQL (the races
are its row locks); each request on a thread (and connection) of its own, repeated at a
few offsets until the two meet."""

from __future__ import annotations

import threading
import time

import pytest
from django.db import connection
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from agents.models import Agent, Tool
from automation.models import WebhookEndpoint
from tests.factories import AgentFactory, ProjectFactory

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        connection.vendor != "postgresql", reason="SQLite serializes all writes: no race"
    ),
]

DELAYS = (0, 0.002, 0.005, 0.01, 0.02)
ROUNDS = 8  # per delay; before the locks, each race met its 500 in about every second round


def _client(user) -> APIClient:
    client = APIClient()
    token, _ = Token.objects.get_or_create(user=user)
    client.credentials(HTTP_AUTHORIZATION=f"Token {token.key}")
    client.raise_request_exception = False  # a 500 is an answer here
    return client


def _race(user, first, second, delay):
    """`first` and `second` (each `fn(client)`) on two threads, `second` `delay`
    seconds later; their (status, body) pairs."""
    out: list = [None, None]
    barrier = threading.Barrier(2)

    def run(index, wait, fn):
        client = _client(user)
        try:
            barrier.wait()
            time.sleep(wait)
            response = fn(client)
            out[index] = (response.status_code, response.content[:300])
        finally:
            connection.close()

    threads = [
        threading.Thread(target=run, args=(0, 0, first)),
        threading.Thread(target=run, args=(1, delay, second)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return out


def _world(user) -> dict:
    project = ProjectFactory(owner=user)
    agent = AgentFactory(project=project)
    client = _client(user)
    webhook = client.post(
        f"/my/projects/{project.id}/webhooks/",
        {"url": "https://93.184.216.34/hook", "events": ["run.failed"]},
        format="json",
    )
    assert webhook.status_code == 201, webhook.content
    tool = Tool.objects.create(agent=agent, kind="builtin", name="search_context")
    base = f"/my/projects/{project.id}"
    return {
        "base": base, "p": project.id, "a": agent.id, "w": webhook.json()["id"], "t": tool.id,
    }  # fmt: skip


def _until_500(user, first, second, check=None):
    """Race `first` and `second` over fresh worlds until one answers 5xx (returned with
    the delay), or every round passed (None). `check(world, a, b)` may assert more."""
    for delay in DELAYS:
        for _ in range(ROUNDS):
            world = _world(user)
            a, b = _race(
                user, lambda c, w=world: first(c, w), lambda c, w=world: second(c, w), delay
            )
            if a[0] >= 500 or b[0] >= 500:
                return delay, a, b
            if check:
                check(world, a, b)
    return None


PROJECT_WRITES = {
    "PATCH project": lambda c, w: c.patch(f"{w['base']}/", {"description": "x"}, format="json"),
    "POST webhooks": lambda c, w: c.post(
        f"{w['base']}/webhooks/",
        {"url": "https://93.184.216.34/h2", "events": ["run.failed"]},
        format="json",
    ),
    "POST keys": lambda c, w: c.post(
        f"{w['base']}/keys/", {"name": "k", "scopes": ["read"]}, format="json"
    ),
    "PUT provider": lambda c, w: c.put(
        f"{w['base']}/provider/",
        {
            "base_url": "https://93.184.216.34/v1",
            "api_key": "k",
            "default_model": "",
            "allowed_models": [],
        },
        format="json",
    ),
    "PUT retention": lambda c, w: c.put(
        f"{w['base']}/retention/", {"sessions_days": 1}, format="json"
    ),
    "POST exports": lambda c, w: c.post(f"{w['base']}/exports/", {}, format="json"),
}


@pytest.mark.slow
@pytest.mark.parametrize("write", list(PROJECT_WRITES))
def test_a_write_racing_the_projects_delete_is_404_not_500(transactional_db, user, write):
    """A write that read the project before its DELETE committed would insert a row
    whose project is gone (a foreign key error) or update a row that is gone: each holds
    the project (project_lock_for_write) and is a 404 once it was deleted."""
    met = _until_500(user, lambda c, w: c.delete(f"{w['base']}/"), PROJECT_WRITES[write])
    assert met is None, met


AGENT_WRITES = {
    "PATCH agent": lambda c, w: c.patch(
        f"{w['base']}/agents/{w['a']}/", {"system_prompt": "changed"}, format="json"
    ),
    "POST chat": lambda c, w: c.post(
        f"{w['base']}/chat/", {"agent_id": str(w["a"])}, format="json"
    ),
    "POST tools": lambda c, w: c.post(
        f"{w['base']}/agents/{w['a']}/tools/",
        {"kind": "builtin", "name": "add_context"},
        format="json",
    ),  # fmt: skip
    "PATCH tool": lambda c, w: c.patch(
        f"{w['base']}/agents/{w['a']}/tools/{w['t']}/", {"description": "changed"}, format="json"
    ),
    "POST memory": lambda c, w: c.post(
        f"{w['base']}/agents/{w['a']}/memory/", {"label": "notes", "value": "x"}, format="json"
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("write", list(AGENT_WRITES))
def test_a_write_racing_the_agents_delete_is_not_a_500(transactional_db, user, write):
    """The delete collects the agent's versions, sessions and tools; a write adding one
    meanwhile would make the DELETE fail (the agent stays) or itself fail (its agent is
    gone). Writers hold the agent (agent_lock_for_write) and the delete waits for them:
    a write that lost is a 404, and an agent answered 204 is gone."""

    def check(world, deleted, _written):
        if deleted[0] == 204:
            assert not Agent.objects.filter(id=world["a"]).exists()

    met = _until_500(
        user, lambda c, w: c.delete(f"{w['base']}/agents/{w['a']}/"), AGENT_WRITES[write], check
    )
    assert met is None, met


@pytest.mark.slow
@pytest.mark.parametrize("action", ["PATCH", "rotate-secret"])
def test_a_webhook_change_racing_its_delete_is_404_not_500(transactional_db, user, action):
    """A change saves the row it read; the endpoint is held first, and a change that
    lost to the DELETE is a 404 that brings nothing back."""

    def change(c, w):
        url = f"{w['base']}/webhooks/{w['w']}/"
        if action == "PATCH":
            return c.patch(url, {"description": "d"}, format="json")
        return c.post(f"{url}rotate-secret/", {}, format="json")

    met = _until_500(user, lambda c, w: c.delete(f"{w['base']}/webhooks/{w['w']}/"), change)
    assert met is None, met
    assert not WebhookEndpoint.objects.filter(description="d").exists()
