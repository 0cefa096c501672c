"""MCP tools: an MCP server (the official SDK's own, over streamable HTTP, in this
process) is listed at the start of a run, its tools offered to the model under the
tool's prefix, called through the SDK's client, and its listing cached per project."""

from __future__ import annotations

import socket
import threading

import pytest
import uvicorn

from agents.models import ProjectSecret, Tool
from chat.lease import lease_keeper
from tests.factories import AgentFactory, ChatSessionFactory
from tests.runtime.conftest import stream_events, wait_for_event
from tests.runtime.test_chat import post_message
from tests.workers import wait_until
from tools.http import ToolError
from tools.mcp import mcp_call, mcp_list

pytestmark = pytest.mark.slow

SECRET = "mcp-tok-0b1d2e3f4a5b"
ENDS = {"message.completed", "message.error", "message.cancelled"}


class McpServer:
    """The SDK's MCPServer under uvicorn; counts the requests that list its tools."""

    def __init__(self, *, more_tools: int = 0) -> None:
        # the MCP SDK loads only in the tests that start this server
        from mcp.server.mcpserver import MCPServer
        from mcp.server.mcpserver.exceptions import ToolError

        server = MCPServer("calc")
        self.listings = 0
        self.authorizations: list[str] = []

        @server.tool()
        def text(kib: int) -> str:
            """`kib` KiB of text."""
            return "x" * (kib * 1024)

        for i in range(more_tools):
            server.add_tool(lambda: "", name=f"more_{i}", description="One of many.")

        @server.tool()
        def add(a: int, b: int) -> int:
            """Add two integers."""
            return a + b

        @server.tool()
        def fail() -> str:
            """Always fails."""
            raise ToolError("broken on purpose")

        app = server.streamable_http_app(stateless_http=True, json_response=True)

        async def counting(scope, receive, send):
            if scope["type"] == "http":
                headers = dict(scope["headers"])
                self.authorizations.append(headers.get(b"authorization", b"").decode())
                body = []

                async def peek():
                    message = await receive()
                    body.append(message.get("body", b""))
                    if b'"tools/list"' in b"".join(body):
                        self.listings += 1
                    return message

                return await app(scope, peek, send)
            return await app(scope, receive, send)

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/mcp"
        self.server = uvicorn.Server(uvicorn.Config(counting, log_level="warning"))
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def start(self) -> McpServer:
        self.thread.start()
        wait_until(lambda: self.server.started, timeout=10, what="MCP server start")
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


@pytest.fixture
def mcp_server(runtime_settings):
    runtime_settings.EGRESS_ALLOW_NETWORKS = {"mcp": ["127.0.0.0/8"]}  # it listens on loopback
    server = McpServer().start()
    yield server
    server.stop()


def ask(api, redis_client, session, text):
    answer_id = post_message(api, session, text)["assistant_message_id"]
    kind, data = wait_for_event(
        redis_client, session.project, session.id, types=ENDS, message_id=answer_id
    )
    results = [
        d
        for _, k, d in stream_events(redis_client, session.project, session.id)
        if k == "tool.result" and d["message_id"] == answer_id
    ]
    return kind, data, results


def test_mcp_tools_are_listed_called_and_the_list_cached(
    live_worker, api, project, redis_client, fake_openai, mcp_server
):
    agent = AgentFactory(project=project, model="gpt-local")
    ProjectSecret.objects.create(project=project, name="MCP_TOKEN", value=SECRET)
    Tool.objects.create(
        agent=agent,
        kind="mcp",
        name="calc",
        url_template=mcp_server.url,
        headers={"Authorization": "Bearer {{secret:MCP_TOKEN}}"},
    )
    session = ChatSessionFactory(agent=agent, project=project)
    fake_openai.turns = [
        {"tool_calls": [("calc__add", {"a": 2, "b": 40}), ("calc__fail", {})]},
    ]
    kind, data, results = ask(api, redis_client, session, "Add, please.")
    assert kind == "message.completed", data
    offered = {t["function"]["name"]: t for t in fake_openai.requests[0]["body"]["tools"]}
    assert set(offered) == {"calc__add", "calc__fail", "calc__text"}
    assert offered["calc__add"]["function"]["parameters"]["required"] == ["a", "b"]
    added, failed = sorted(results, key=lambda r: r["name"])
    assert added["ok"] and added["result"] == "42"
    assert not failed["ok"] and "broken on purpose" in failed["result"]
    assert f"Bearer {SECRET}" in mcp_server.authorizations

    # The next run takes the list from the project's cache. (Runs without calls here:
    # the SDK's client lists the tools itself before each call, to check its result.)
    listed = mcp_server.listings
    assert ask(api, redis_client, session, "Again.")[0] == "message.completed"
    assert mcp_server.listings == listed
    assert "calc__add" in str(fake_openai.requests[-1]["body"]["tools"])
    assert len(list(redis_client.scan_iter(match="*mcp_tools:*"))) == 1

    # A change of the tool lists the server again.
    tool = Tool.objects.get()
    tool.description = "changed"
    tool.save()
    assert ask(api, redis_client, session, "Once more.")[0] == "message.completed"
    assert mcp_server.listings == listed + 1
    assert SECRET not in str(results) + str(fake_openai.requests)


def test_an_mcp_server_on_a_private_address_is_refused(
    live_worker, api, project, redis_client, fake_openai, mcp_server, runtime_settings
):
    runtime_settings.EGRESS_ALLOW_NETWORKS = {}
    agent = AgentFactory(project=project, model="gpt-local")
    Tool.objects.create(agent=agent, kind="mcp", name="calc", url_template=mcp_server.url)
    session = ChatSessionFactory(agent=agent, project=project)
    kind, data, _results = ask(api, redis_client, session, "Hello.")
    assert kind == "message.completed", data
    assert "tools" not in fake_openai.requests[0]["body"]  # left out of the run
    # The worker is done with the run: nothing of it can list the server any more.
    wait_until(lambda: not lease_keeper().held(), what="the worker done with the run")
    assert mcp_server.listings == 0 and mcp_server.authorizations == []


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"url_template": ""}, "url_template"),
        ({"url_template": "https://mcp.example.com/{x}"}, "url_template"),
        ({"method": "GET"}, "method"),
        ({"name": "a_prefix_longer_than_twenty"}, "name"),
    ],
)
def test_bad_mcp_tools_are_400(api, agent, change, field):
    body = {"kind": "mcp", "name": "calc", "url_template": "https://mcp.example.com/mcp"}
    response = api.post(
        f"/my/projects/{agent.project_id}/agents/{agent.id}/tools/",
        {**body, **change},
        format="json",
    )
    assert response.status_code == 400, response.content
    assert field in response.json()
    assert not Tool.objects.exists()


def test_an_mcp_servers_answer_and_listing_are_bounded(settings, runtime_settings):
    """A tenant's MCP server is anyone's: an answer past MCP_ANSWER_MAX_BYTES is cut off
    as it arrives (read whole, a tool's result of any size was held by the worker), and
    a listing of more than MCP_MAX_TOOLS tools is refused."""
    runtime_settings.EGRESS_ALLOW_NETWORKS = {"mcp": ["127.0.0.0/8"]}
    settings.MCP_ANSWER_MAX_BYTES = 256 * 1024
    settings.MCP_MAX_TOOLS = 10
    server = McpServer(more_tools=20).start()
    try:
        call = {"url": server.url, "header_templates": {}, "secrets": {}, "timeout": 10}
        assert mcp_call(name="text", arguments={"kib": 100}, **call) == (True, "x" * 102400)
        with pytest.raises(ToolError, match="passed 262144 bytes"):
            mcp_call(name="text", arguments={"kib": 4096}, **call)
        with pytest.raises(ToolError, match="more than 10 tools"):
            mcp_list(url=server.url, header_templates={}, secrets={})
        settings.MCP_MAX_TOOLS = 128
        assert len(mcp_list(url=server.url, header_templates={}, secrets={})) == 23
    finally:
        server.stop()
