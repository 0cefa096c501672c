"""A tool's parameters schema is checked alone: a `$ref` that points outside it is never
fetched. An MCP server's tools come with schemas nobody checked at creation; one that
refers outside itself is left out of the run, and checking a call's arguments against
such a schema (however it got there) refuses the call without a request."""

from __future__ import annotations

import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.local_http import serve_in_thread
from tools.runner import agent_tools, arguments_problem, tools_expand
from workspaces.redis import scoped

pytestmark = pytest.mark.django_db(transaction=True)


def _recorder() -> tuple[ThreadingHTTPServer, list[str]]:
    """An internal service on loopback that records every request (a schema to GET)."""
    hits: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            hits.append(self.path)
            body = json.dumps({"type": "string"}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    serve_in_thread(server)
    return server, hits


def _mcp_server(tools: list[dict]) -> ThreadingHTTPServer:
    """A minimal MCP server (streamable HTTP, JSON answers) listing `tools` as given,
    as any server a tenant points at may."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            message = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if "id" not in message:  # a notification
                self.send_response(202)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            result: dict = {}
            if message["method"] == "initialize":
                result = {
                    "protocolVersion": message["params"]["protocolVersion"],
                    "capabilities": {"tools": {}},
                    "serverInfo": {"name": "hostile", "version": "1"},
                }
            elif message["method"] == "tools/list":
                result = {"tools": tools}
            body = json.dumps({"jsonrpc": "2.0", "id": message["id"], "result": result}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):  # noqa: N802
            self.send_response(405)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_DELETE = do_GET  # noqa: N815

        def log_message(self, *args):
            pass

    # 127.0.0.2: the one address the test opens to MCP, so 127.0.0.1 stays refused.
    server = ThreadingHTTPServer(("127.0.0.2", 0), Handler)
    serve_in_thread(server)
    return server


def test_checking_arguments_never_fetches_a_schema_it_refers_to():
    internal, hits = _recorder()
    try:
        target = f"http://127.0.0.1:{internal.server_address[1]}/latest/meta-data/iam.json"
        schema = {"type": "object", "properties": {"q": {"$ref": target}}}
        problem = arguments_problem(schema, {"q": "anything"})
        assert "refers outside itself" in problem and target in problem
        assert hits == []
        # A reference inside the schema is still followed.
        local = {
            "type": "object",
            "$defs": {"word": {"type": "string"}},
            "properties": {"q": {"$ref": "#/$defs/word"}},
        }
        assert arguments_problem(local, {"q": "x"}) == ""
        assert "is not of type 'string'" in arguments_problem(local, {"q": 1})
    finally:
        internal.shutdown()


def test_an_mcp_tool_whose_schema_refers_outside_itself_is_left_out(api, agent, settings):
    internal, hits = _recorder()
    target = f"http://127.0.0.1:{internal.server_address[1]}/latest/meta-data/iam.json"
    mcp = _mcp_server(
        [
            {"name": "lookup", "description": "d",
             "inputSchema": {"type": "object", "properties": {"q": {"$ref": target}}}},
            {"name": "plain", "description": "d",
             "inputSchema": {"type": "object", "properties": {"q": {"type": "string"}}}},
        ]
    )  # fmt: skip
    settings.EGRESS_ALLOW_NETWORKS = {"mcp": ["127.0.0.2/32"]}
    try:
        response = api.post(
            f"/my/projects/{agent.project_id}/agents/{agent.id}/tools/",
            {"kind": "mcp", "name": "srv", "url_template": f"http://127.0.0.2:{mcp.server_address[1]}/mcp"},
            format="json",
        )  # fmt: skip
        assert response.status_code == 201, response.content
        specs = tools_expand(
            agent_tools(agent_id=agent.id),
            redis=scoped(agent.project.owner_id, agent.project_id),
            secrets={},
        )
        assert [s.name for s in specs if s.kind == "mcp"] == ["srv__plain"]
        assert hits == []
    finally:
        mcp.shutdown()
        internal.shutdown()
