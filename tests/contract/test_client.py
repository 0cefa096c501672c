"""A client generated from the served schema (openapi-python-client, at test time, so it
is always the schema of this code) drives a user's whole journey against the live
server and a real worker: token -> project -> agent -> context (add, follow the job,
search) -> chat session -> message -> its events on the stream -> messages -> delete.

Every call goes through the generated functions and models, with
`raise_on_unexpected_status`: an answer the schema does not list fails the test. The
event stream is read through the generated client's own HTTP client (a generated
function would wait for the end of a stream that never ends), and each event's data is
parsed with the generated event models.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow

PACKAGE = "uws_client"


def generate_client(schema_url: str, directory: Path):
    schema = directory / "schema.json"
    schema.write_text(httpx.get(schema_url, params={"format": "json"}, timeout=30).text)
    config = directory / "config.yaml"
    config.write_text(f"package_name_override: {PACKAGE}\npost_hooks: []\n")
    generator = Path(sys.executable).parent / "openapi-python-client"
    result = subprocess.run(
        [str(generator), "generate", "--path", str(schema), "--meta", "none",
         "--config", str(config), "--output-path", str(directory / PACKAGE)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Warning" not in result.stdout + result.stderr, result.stdout + result.stderr
    sys.path.insert(0, str(directory))
    for name in [m for m in sys.modules if m == PACKAGE or m.startswith(PACKAGE + ".")]:
        del sys.modules[name]
    importlib.invalidate_caches()
    return importlib.import_module(PACKAGE)


def read_events(http: httpx.Client, url: str, *, until, timeout: float = 60) -> list[dict]:
    """SSE events ({"id", "event", "data"}) until `until(events)` holds."""
    events, current = [], {}
    deadline = time.monotonic() + timeout
    with http.stream("GET", url, params={"cursor": "0"}, timeout=timeout) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            assert time.monotonic() < deadline, f"no end of the answer in {events}"
            if line == "":
                if "data" in current:
                    current["data"] = json.loads(current["data"])
                    events.append(current)
                    if until(events):
                        return events
                current = {}
            elif not line.startswith(":"):
                field, _, value = line.partition(":")
                current[field] = value.removeprefix(" ")
    raise AssertionError(f"the stream ended early: {events}")


def test_a_generated_client_drives_the_whole_journey(
    asgi_server, token_user, live_worker, tmp_path
):
    user, _token = token_user
    uws = generate_client(f"{asgi_server.url}/api/schema/", tmp_path)
    # the client's package exists only once generate_client() has written it
    from uws_client import models
    from uws_client.api.agents import agents_create, agents_retrieve
    from uws_client.api.authentication import auth_token_create
    from uws_client.api.chat import (
        messages_create,
        messages_list,
        sessions_create,
        sessions_list,
    )
    from uws_client.api.context import context_add, context_job_retrieve, context_search
    from uws_client.api.projects import projects_create, projects_destroy, projects_retrieve

    # A token for a username and password, then Bearer authentication with it.
    anonymous = uws.Client(base_url=asgi_server.url, raise_on_unexpected_status=True)
    token = auth_token_create.sync(
        client=anonymous,
        body=models.CredentialsRequest(username=user.username, password="pw-123456"),
    )
    assert isinstance(token, models.Token)
    client = uws.AuthenticatedClient(
        base_url=asgi_server.url, token=token.token, raise_on_unexpected_status=True
    )
    assert client.prefix == "Bearer"

    project = projects_create.sync(client=client, body=models.ProjectInputRequest(name="Support"))
    assert isinstance(project, models.Project) and project.name == "Support"

    agent = agents_create.sync(
        project.id,
        client=client,
        body=models.AgentInputRequest(
            name="helper",
            system_prompt="You answer questions about our product.",
            params=models.AgentInputRequestParams.from_dict({"top_k": 3}),
        ),
    )
    assert isinstance(agent, models.Agent)
    taken = agents_create.sync(
        project.id, client=client, body=models.AgentInputRequest(name="helper")
    )
    assert isinstance(taken, models.Error) and taken.code == "conflict"
    assert taken.additional_properties["name"]  # the error names the field

    fact = "The office cat is called Biscuit."
    accepted = context_add.sync(
        project.id, agent.id, client=client, body=models.ContextInputRequest(documents=[fact])
    )
    assert isinstance(accepted, models.ContextJobAccepted)
    deadline = time.monotonic() + 90
    while True:
        job = context_job_retrieve.sync(project.id, agent.id, accepted.job_id, client=client)
        assert isinstance(job, models.ContextJob), job
        if job.status in (models.ContextJobStatusEnum.DONE, models.ContextJobStatusEnum.ERROR):
            break
        assert time.monotonic() < deadline, job
        time.sleep(0.2)
    assert job.status == models.ContextJobStatusEnum.DONE, job.error
    hits = context_search.sync(project.id, agent.id, client=client, q="cat name", k=3)
    assert isinstance(hits, models.ContextSearchResults)
    assert hits.results[0].text == fact

    session = sessions_create.sync(
        project.id, client=client, body=models.SessionInputRequest(agent_id=agent.id, title="t")
    )
    assert isinstance(session, models.Session)
    assert sessions_list.sync(project.id, client=client).total == 1

    sent = messages_create.sync(
        project.id, session.id, client=client,
        body=models.MessageInputRequest(content="What is the cat called?"),
    )  # fmt: skip
    assert isinstance(sent, models.MessageAccepted)
    answer_id = sent.assistant_message_id

    url = f"/my/projects/{project.id}/chat/{session.id}/events/"
    events = read_events(
        client.get_httpx_client(),
        url,
        until=lambda es: any(
            e["event"] in ("message.completed", "message.error")
            and e["data"].get("message_id") == answer_id
            for e in es
        ),
    )
    kinds = [e["event"] for e in events]
    assert kinds[:2] == ["message.created", "message.created"], kinds
    created = [models.MessageCreatedEvent.from_dict(e["data"]) for e in events[:2]]
    assert [m.role for m in created] == [models.RoleEnum.USER, models.RoleEnum.ASSISTANT]
    deltas = [
        models.MessageDeltaEvent.from_dict(e["data"])
        for e in events
        if e["event"] == "message.delta"
    ]
    completed = models.MessageCompletedEvent.from_dict(events[-1]["data"])
    assert events[-1]["event"] == "message.completed"
    assert "".join(d.delta for d in deltas) == completed.content
    assert [d.offset for d in deltas][0] == 0
    assert "Biscuit" in completed.content  # answered from the agent's context
    assert all(e["id"] for e in events)

    listing = messages_list.sync(project.id, session.id, client=client)
    assert isinstance(listing, models.PaginatedMessageList)
    assert [m.status for m in listing.messages] == [
        models.MessageStatusEnum.DONE,
        models.MessageStatusEnum.DONE,
    ]
    assert listing.messages[1].content == completed.content

    assert projects_destroy.sync_detailed(project.id, client=client).status_code == 204
    gone = projects_retrieve.sync(project.id, client=client)
    assert isinstance(gone, models.Error) and gone.code == "not_found"
    missing_agent = agents_retrieve.sync(project.id, agent.id, client=client)
    assert isinstance(missing_agent, models.Error)
