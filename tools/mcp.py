"""MCP tools: the tools of an MCP server (streamable HTTP), through the official `mcp`
SDK. An agent's MCP tool names a server (`url_template` is its endpoint, `headers` may
carry the project's secrets); at the start of a run the server's tools are listed (the
listing cached in the project's workspace Redis for MCP_LIST_CACHE_SECONDS, keyed by
the tool and its last change) and offered to the model as `<tool name>__<server's tool
name>`.

Every request to the server leaves through the egress guard (common.egress, purpose
`mcp`): the SDK is handed a client whose transport resolves the host, checks every
address (no loopback, private or link-local address unless EGRESS_ALLOW_NETWORKS_MCP
opens it) and connects to the checked address, so DNS cannot rebind it between the
check and the connection.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any
from urllib.parse import urlsplit

from django.conf import settings

from common import egress

from .http import ToolError, fill_headers, resolve_checked

logger = logging.getLogger(__name__)

SEPARATOR = "__"


def _check_url(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ToolError("the MCP server's URL is not an http(s) URL")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    resolve_checked(parts.hostname, port, purpose=egress.MCP)  # a clear error before the SDK


async def _session(url: str, headers: dict[str, str], timeout: float, work):
    # Here, not at the top: the mcp SDK takes ~0.7 s to import, and only a worker
    # calling an MCP server needs it.
    import httpx2
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    # The SDK's factory signature; the transport checks and pins every request it sends.
    create_client = egress.guarded_async_client_factory(
        purpose=egress.MCP, httpx_module=httpx2, max_answer_bytes=settings.MCP_ANSWER_MAX_BYTES
    )
    async with create_client(headers=headers, timeout=httpx2.Timeout(timeout)) as http:
        transport = streamable_http_client(url, http_client=http)
        async with Client(transport, read_timeout_seconds=timeout) as client:
            return await work(client)


def _run(url: str, headers: dict[str, str], timeout: float, work) -> Any:
    """Run `work(client)` against the server, in this thread's own event loop."""
    _check_url(url)
    try:
        return asyncio.run(asyncio.wait_for(_session(url, headers, timeout, work), timeout))
    except TimeoutError:
        raise ToolError(f"the MCP server did not answer within {timeout:g}s") from None
    except ToolError:
        raise
    except Exception as exc:
        found = _cause(exc, (egress.EgressRefused, egress.AnswerRefused, ToolError))
        if isinstance(found, egress.AnswerRefused):
            raise ToolError(f"MCP server: {found} (MCP_ANSWER_MAX_BYTES)") from None
        if found is not None:
            raise ToolError(str(found)) from None
        logger.warning("MCP server %s failed: %s", urlsplit(url).hostname, type(exc).__name__)
        raise ToolError(f"the MCP server failed ({type(exc).__name__})") from None


def _cause(exc: BaseException, types: tuple[type[Exception], ...]) -> BaseException | None:
    """The guard's refusal (of the address, or of an answer too large), or our own
    ToolError, inside what the SDK raised (it wraps them, in groups too)."""
    seen = 0
    stack = [exc]
    while stack and seen < 50:
        seen += 1
        current = stack.pop()
        if isinstance(current, types):
            return current
        stack += list(getattr(current, "exceptions", ()))
        stack += [e for e in (current.__cause__, current.__context__) if e is not None]
    return None


def mcp_list(*, url: str, header_templates: dict[str, str], secrets: dict[str, str]) -> list[dict]:
    """The server's tools: [{"name", "description", "parameters", "safe_to_repeat"}]."""

    async def work(client):
        listing, cursor = [], None
        while True:
            page = await client.list_tools(cursor=cursor)
            listing += page.tools
            if len(listing) > settings.MCP_MAX_TOOLS:
                raise ToolError(
                    f"the MCP server lists more than {settings.MCP_MAX_TOOLS} tools (MCP_MAX_TOOLS)"
                )
            cursor = page.next_cursor
            if not cursor:
                return listing

    tools = _run(url, fill_headers(header_templates, secrets), settings.TOOL_TIMEOUT_SECONDS, work)
    return [
        {
            "name": tool.name,
            "description": tool.description or "",
            "parameters": tool.input_schema or {"type": "object", "properties": {}},
            # Only what the server says changes nothing, or may be repeated, is.
            "safe_to_repeat": bool(
                tool.annotations
                and (tool.annotations.read_only_hint or tool.annotations.idempotent_hint)
            ),
        }
        for tool in tools
    ]


def mcp_tools_cached(
    *, redis, tool_id: str, version: str, url: str, header_templates: dict, secrets: dict
) -> list[dict]:
    """`mcp_list`, cached per project (workspace Redis) and per version of the tool."""
    key = f"mcp_tools:{tool_id}:{version}"
    try:
        cached = redis.get(key)
    except Exception:
        cached = None
    if cached:
        return json.loads(cached)
    tools = mcp_list(url=url, header_templates=header_templates, secrets=secrets)
    try:
        redis.set(key, json.dumps(tools), ex=max(1, int(settings.MCP_LIST_CACHE_SECONDS)))
    except Exception:
        logger.warning("MCP tool list of %s not cached (Redis down?)", tool_id)
    return tools


def mcp_call(
    *,
    url: str,
    header_templates: dict[str, str],
    secrets: dict[str, str],
    name: str,
    arguments: dict[str, Any],
    timeout: float,
) -> tuple[bool, str]:
    """Call the server's tool `name`: (ok, its result as text)."""

    async def work(client):
        return await client.call_tool(name, arguments)

    result = _run(url, fill_headers(header_templates, secrets), timeout, work)
    parts = []
    for item in result.content or ():
        text = getattr(item, "text", None)
        parts.append(text if text is not None else item.model_dump_json())
    if not parts and result.structured_content is not None:
        parts.append(json.dumps(result.structured_content, ensure_ascii=False))
    return not result.is_error, "\n".join(parts)
