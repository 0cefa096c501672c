"""What a tenant can point the backend at: a project's own LLM endpoint, HTTP tools and
MCP servers all leave through one egress guard, and the deployment's LLM key goes only
to the deployment's own endpoint. The attacker's server is a real HTTP server on
loopback that records every header it receives."""

from __future__ import annotations

import socket

import pytest

from common import egress
from common.egress import check_allowed_networks
from tests.factories import AgentFactory, ChatSessionFactory
from tests.governance.conftest import messages_url, wait_answered
from tests.runtime.openai_server import FakeOpenAI
from tests.runtime.test_mcp import McpServer
from tools.http import ToolError, resolve_checked
from tools.mcp import mcp_list

CANARY = "sk-deployment-canary-5d1e9a7c"


def provider_url(project) -> str:
    return f"/my/projects/{project.id}/provider/"


@pytest.fixture
def attacker():
    server = FakeOpenAI().start()
    yield server
    server.stop()


@pytest.fixture
def deployment(runtime_settings, fake_openai):
    """The deployment's own endpoint (the stub) with a canary key."""
    runtime_settings.OPENAI_API_KEY = CANARY
    return fake_openai


def _point_project_at(api, project, base_url, **extra):
    body = {"base_url": base_url, "default_model": "", "allowed_models": [], **extra}
    response = api.put(provider_url(project), body, format="json")
    assert response.status_code == 200, response.content


def _ask(api, project):
    session = ChatSessionFactory(agent=AgentFactory(project=project, model="m"))
    posted = api.post(messages_url(session), {"content": "hi"}, format="json").json()
    return wait_answered(posted["assistant_message_id"])


@pytest.mark.slow
def test_the_deployments_key_never_reaches_a_projects_endpoint(
    live_worker, api, project, deployment, attacker, runtime_settings
):
    # The attacker's host stands for a public one: the operator opened loopback.
    runtime_settings.EGRESS_ALLOW_NETWORKS = {"provider": ["127.0.0.0/8"]}
    _point_project_at(api, project, attacker.base_url)  # no api_key of its own
    answer = _ask(api, project)
    assert answer.status == "done", answer.error
    assert attacker.headers, "the project's endpoint was called"
    assert all(CANARY not in str(headers) for headers in attacker.headers)
    assert deployment.requests == []  # and not the deployment's endpoint either

    # With a key of its own, that key goes there (and still not the deployment's).
    _point_project_at(api, project, attacker.base_url, api_key="sk-projects-own-key")
    assert _ask(api, project).status == "done"
    assert attacker.headers[-1]["authorization"] == "Bearer sk-projects-own-key"
    assert all(CANARY not in str(headers) for headers in attacker.headers)


@pytest.mark.slow
def test_a_projects_endpoint_on_an_internal_address_is_refused_before_any_call(
    live_worker, api, project, deployment, attacker
):
    _point_project_at(api, project, attacker.base_url)  # 127.0.0.1: not opened
    answer = _ask(api, project)
    assert answer.status == "error"
    assert "refused" in answer.error and "non-public address" in answer.error
    assert attacker.requests == []  # nothing reached it
    assert CANARY not in answer.error


@pytest.mark.slow
def test_a_projects_endpoint_error_says_it_failed_not_what_answered(
    live_worker, api, project, deployment, attacker, runtime_settings
):
    """An internal port's answer is no oracle: even where the operator opened a network,
    the owner learns that the endpoint failed, not its status or body."""
    runtime_settings.EGRESS_ALLOW_NETWORKS = {"provider": ["127.0.0.0/8"]}
    attacker.mode, attacker.error_status = "error", 418
    _point_project_at(api, project, attacker.base_url)
    answer = _ask(api, project)
    assert answer.status == "error" and "endpoint failed" in answer.error
    assert "418" not in answer.error and "overloaded" not in answer.error


@pytest.mark.slow
def test_metadata_and_redis_ports_are_refused_as_provider_urls(
    live_worker, api, project, deployment
):
    for url in ("http://169.254.169.254/latest/v1", "http://localhost:6379/"):
        _point_project_at(api, project, url)
        answer = _ask(api, project)
        assert answer.status == "error" and "refused" in answer.error, answer.error


@pytest.mark.parametrize(
    "host",
    [
        "::127.0.0.1",  # IPv4-compatible
        "::ffff:0:7f00:1",  # IPv4-translated
        "64:ff9b::7f00:1",  # NAT64
        "64:ff9b:1::7f00:1",  # local-use NAT64
        "2002:7f00:1::",  # 6to4 of 127.0.0.1
        "2001:0:4136:e378:8000:63bf:80ff:fffe",  # Teredo, client 127.0.0.1
        "fec0::1",  # site-local
        "fd12:3456::1",  # unique-local
        "ff02::1",  # multicast
        "100.64.0.1",  # shared (carrier-grade NAT)
    ],
)
def test_ipv6_forms_of_internal_addresses_are_refused(runtime_settings, host):
    with pytest.raises(ToolError, match="non-public address"):
        resolve_checked(host, 80)


def test_a_network_the_operator_opens_is_opened_for_its_purpose_only(runtime_settings):
    runtime_settings.EGRESS_ALLOW_NETWORKS = {"provider": ["10.0.0.0/8"]}
    assert egress.resolve_checked("10.1.2.3", 80, purpose=egress.PROVIDER) == "10.1.2.3"
    for purpose in (egress.TOOLS, egress.MCP):
        with pytest.raises(egress.EgressRefused):
            egress.resolve_checked("10.1.2.3", 80, purpose=purpose)
    with pytest.raises(egress.EgressRefused):  # outside the opened network
        egress.resolve_checked("192.168.1.1", 80, purpose=egress.PROVIDER)


@pytest.fixture
def rebinding_dns(monkeypatch):
    """`rebind.test` resolves to a public address the first time, then to loopback: a
    DNS answer that changes between the check and the connection."""
    real = socket.getaddrinfo
    answers = []

    def getaddrinfo(host, port, *args, **kwargs):
        if isinstance(host, bytes):  # anyio passes the IDNA-encoded name
            host = host.decode()
        if host != "rebind.test":
            return real(host, port, *args, **kwargs)
        address = "93.184.216.34" if not answers else "127.0.0.1"
        answers.append(address)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return answers


@pytest.mark.slow
def test_mcp_connections_are_pinned_to_the_checked_address(runtime_settings, rebinding_dns):
    runtime_settings.EGRESS_ALLOW_NETWORKS = {}
    server = McpServer().start()
    try:
        port = server.url.rsplit(":", 1)[1].split("/", 1)[0]
        with pytest.raises(ToolError):
            mcp_list(url=f"http://rebind.test:{port}/mcp", header_templates={}, secrets={})
        assert server.authorizations == []  # the loopback server saw no request
    finally:
        server.stop()


def test_a_malformed_network_fails_the_checks(runtime_settings):
    runtime_settings.EGRESS_ALLOW_NETWORKS = {"provider": ["10.0.0.0/33"]}
    assert [e.id for e in check_allowed_networks()] == ["common.E001"]
    runtime_settings.EGRESS_ALLOW_NETWORKS = {"provider": ["10.0.0.0/8", "fd00::/8"]}
    assert check_allowed_networks() == []
