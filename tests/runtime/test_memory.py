"""Memory blocks end to end: three blocks reach the provider verbatim in the system
prompt (the OpenAI-protocol test server records the request), the agent edits them
with its builtin tools within their limits (each edit audited and announced as
`memory.updated`), and the owner's API validates every input and keeps owners apart."""

from __future__ import annotations

import pytest

from agents.models import MemoryBlock, MemoryChange, Tool
from tests.factories import AgentFactory, ChatSessionFactory
from tests.runtime.test_tools import ask, model_agent, of

pytestmark = pytest.mark.slow

BLOCKS = [
    ("persona", "I am Ada, a support agent for Acme.\n  Keep answers short.", 500, "Who you are."),
    ("human", "Customer: Bob <bob@example.com>, plan PRO-7731.", 200, "Who you talk to."),
    ("policy", "Refunds within 30 days; order ids look like ORD-55812.", 300, ""),
]


def memory_url(project, agent, label=""):
    return f"/my/projects/{project.id}/agents/{agent.id}/memory/" + (f"{label}/" if label else "")


def make_blocks(api, project, agent):
    for label, value, limit, description in BLOCKS:
        response = api.post(
            memory_url(project, agent),
            {"label": label, "value": value, "limit": limit, "description": description},
            format="json",
        )
        assert response.status_code == 201, response.content


def test_three_blocks_reach_the_provider_verbatim_and_the_agent_edits_them(
    live_worker, api, project, redis_client, fake_openai
):
    agent = model_agent(project)
    make_blocks(api, project, agent)
    for name in ("memory_append", "memory_replace"):
        Tool.objects.create(agent=agent, kind="builtin", name=name)
    session = ChatSessionFactory(agent=agent, project=project)
    fake_openai.turns = [
        {
            "tool_calls": [
                # A NUL from the model is taken out (PostgreSQL's text refuses it).
                ("memory_append", {"label": "human", "content": "Prefers\u0000 email."}),
                (
                    "memory_replace",
                    {"label": "policy", "old_content": "30 days", "new_content": "45 days"},
                ),  # fmt: skip
            ]
        },
        {"tool_calls": [("memory_append", {"label": "human", "content": "x" * 300})]},
    ]

    kind, data, events, answer = ask(api, redis_client, session, "Hello")
    assert kind == "message.completed", data

    first = fake_openai.requests[0]["body"]["messages"][0]
    assert first["role"] == "system"
    for label, value, limit, description in BLOCKS:
        assert f"\n{value}\n" in first["content"]  # verbatim, spaces and newlines kept
        assert f'<{label} chars="{len(value)}/{limit}">' in first["content"]
        assert f"<description>{description}</description>" in first["content"]

    human = MemoryBlock.objects.get(agent=agent, label="human")
    assert human.value == BLOCKS[1][1] + "\nPrefers email."
    assert MemoryBlock.objects.get(agent=agent, label="policy").value.startswith(
        "Refunds within 45 days"
    )
    updates = of(events, "memory.updated")
    assert sorted((u["label"], u["action"]) for u in updates) == [
        ("human", "append"),
        ("policy", "replace"),
    ]
    # Over the limit: refused, the model told why, nothing written.
    results = [r for r in of(events, "tool.result") if r["step"] == 2]
    assert results[0]["ok"] is False and "limit is 200" in results[0]["result"]
    assert MemoryBlock.objects.get(agent=agent, label="human").value == human.value
    # The next answer's prompt carries the edited blocks.
    fake_openai.turns = []
    ask(api, redis_client, session, "Again")
    assert "Prefers email." in fake_openai.requests[-1]["body"]["messages"][0]["content"]

    by_agent = MemoryChange.objects.filter(agent=agent, actor="agent")
    assert sorted(by_agent.values_list("label", "action")) == [
        ("human", "append"),
        ("policy", "replace"),
    ]
    assert {str(c.run_id) for c in by_agent} == {str(answer.run.id)}
    listed = api.get(memory_url(project, agent) + "changes/").json()
    assert len(listed["changes"]) == 5  # 3 creates by the owner, 2 edits by the agent
    assert {c["actor"] for c in listed["changes"]} == {"owner", "agent"}


@pytest.mark.django_db
def test_owner_api_validates_and_isolates(api, project, other_api):
    agent = AgentFactory(project=project)
    make_blocks(api, project, agent)
    url = memory_url(project, agent)
    bad = [
        {"label": "Has Caps", "value": "x"},
        {"label": "ok", "value": "x" * 11, "limit": 10},
        {"label": "ok", "limit": 10**9},
        {"label": "ok", "extra": 1},
        {"label": "changes"},
        {"value": "no label"},
    ]
    for body in bad:
        response = api.post(url, body, format="json")
        assert response.status_code == 400, (body, response.content)
    assert api.post(url, {"label": "persona"}, format="json").status_code == 409
    assert MemoryBlock.objects.filter(agent=agent).count() == 3
    assert api.patch(memory_url(project, agent, "human"), {"value": "y" * 201},
                     format="json").status_code == 400  # fmt: skip
    response = api.patch(memory_url(project, agent, "human"), {"limit": 10}, format="json")
    assert response.status_code == 400  # the value no longer fits
    response = api.patch(memory_url(project, agent, "human"), {"value": "Bob"}, format="json")
    assert response.status_code == 200 and response.json()["value"] == "Bob"
    assert api.get(memory_url(project, agent, "human")).json()["value"] == "Bob"
    assert [b["label"] for b in api.get(url).json()["blocks"]] == ["persona", "human", "policy"]
    # Another owner: 404 on every route, nothing changed.
    for method, path in [("get", url), ("post", url), ("get", memory_url(project, agent, "human")),
                         ("patch", memory_url(project, agent, "human")),
                         ("delete", memory_url(project, agent, "human")),
                         ("get", url + "changes/")]:  # fmt: skip
        response = getattr(other_api, method)(path, {"label": "zz", "value": "v"}, format="json")
        assert response.status_code == 404, (method, path)
    assert api.delete(memory_url(project, agent, "human")).status_code == 204
    assert api.get(memory_url(project, agent, "human")).status_code == 404
    assert list(MemoryChange.objects.filter(agent=agent, label="human")
                .values_list("action", flat=True)) == ["delete", "update", "create"]  # fmt: skip


@pytest.mark.django_db
def test_admin_edits_are_checked_and_audited(admin_client, project):
    agent = AgentFactory(project=project)
    url = "/admin/agents/memoryblock/add/"
    form = {"agent": str(agent.id), "label": "persona", "value": "x" * 11, "limit": 10,
            "description": ""}  # fmt: skip
    response = admin_client.post(url, form)
    assert response.status_code == 200 and not MemoryBlock.objects.exists()  # over the limit
    response = admin_client.post(url, {**form, "value": "Ada"})
    assert response.status_code == 302, response.content
    block = MemoryBlock.objects.get(agent=agent)
    change = f"/admin/agents/memoryblock/{block.id}/change/"
    response = admin_client.post(change, {**form, "value": "Ada Lovelace", "limit": 20})
    assert response.status_code == 302
    block.refresh_from_db()
    assert block.value == "Ada Lovelace"
    assert list(MemoryChange.objects.filter(agent=agent).values_list("actor", "action")) == [
        ("admin", "update"),
        ("admin", "create"),
    ]
