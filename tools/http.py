"""HTTP tools: one outbound request per call, guarded.

- SSRF: through the egress guard (common.egress, purpose `tools`): the host is resolved
  once, every address it resolves to must be public, and the request connects to that
  checked address (the Host header and TLS SNI keep the name), so a DNS answer that
  changes between the check and the connection cannot redirect it. Redirects are not
  followed. EGRESS_ALLOW_NETWORKS_TOOLS opens it for the operator's own networks.
- A timeout for the whole call (connect, send, read) and a cap on the response size.
- Secrets go into headers only; no header value is ever logged or returned.
"""

from __future__ import annotations

import functools
import json
import ssl
import time
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import httpx
from django.conf import settings

from agents.tool_validation import SECRET_REF, url_placeholders
from common import egress


@functools.cache
def _tls() -> ssl.SSLContext:
    """One TLS context per process: building one (loading the CA bundle) costs more than
    a whole call to a nearby endpoint."""
    return httpx.create_ssl_context()


class ToolError(Exception):
    """A call that could not be made or failed; str() is told to the model."""


def resolve_checked(host: str, port: int, *, purpose: str = egress.TOOLS) -> str:
    """The address to connect to for `host`, through the egress guard; raises ToolError
    when it may not be reached (see common.egress)."""
    try:
        return egress.resolve_checked(host, port, purpose=purpose)
    except egress.EgressRefused as exc:
        raise ToolError(str(exc)) from None


def fill_headers(templates: dict[str, str], secrets: dict[str, str]) -> dict[str, str]:
    def secret(match) -> str:
        name = match.group(1)
        if name not in secrets:
            raise ToolError(f"the project has no secret named {name!r}")
        return secrets[name]

    return {name: SECRET_REF.sub(secret, template) for name, template in templates.items()}


def build_request(
    *, method: str, url_template: str, arguments: dict[str, Any]
) -> tuple[str, dict[str, Any] | None, Any]:
    """(url, query params, JSON body) of a call: placeholders take their arguments
    (percent-encoded), the other arguments go to the query (GET, DELETE) or the body."""
    placeholders = url_placeholders(url_template)
    filled = {n: quote(_plain(arguments.get(n, "")), safe="") for n in placeholders}
    url = url_template.format(**filled)
    rest = {k: v for k, v in arguments.items() if k not in placeholders}
    if method in ("GET", "DELETE"):
        return url, {k: _plain(v) for k, v in rest.items()} or None, None
    return url, None, rest


def _plain(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def http_call(
    *,
    method: str,
    url_template: str,
    header_templates: dict[str, str],
    arguments: dict[str, Any],
    secrets: dict[str, str],
    timeout: float,
) -> str:
    """Make the call; returns "HTTP <status>" and the body (at most
    TOOL_RESPONSE_MAX_BYTES of it, marked when cut). Raises ToolError."""
    url, query, body = build_request(method=method, url_template=url_template, arguments=arguments)
    headers = fill_headers(header_templates, secrets)
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ToolError("the tool's URL is not an http(s) URL")
    host = parts.hostname
    port = parts.port or (443 if parts.scheme == "https" else 80)
    deadline = time.monotonic() + timeout
    address = resolve_checked(host, port)
    netloc_ip = f"[{address}]" if ":" in address else address
    pinned = urlunsplit(parts._replace(netloc=f"{netloc_ip}:{port}"))
    headers["Host"] = host if parts.port is None else f"{host}:{parts.port}"
    extensions = {"sni_hostname": host} if parts.scheme == "https" else {}
    cap = settings.TOOL_RESPONSE_MAX_BYTES
    try:
        with httpx.Client(
            timeout=timeout, follow_redirects=False, trust_env=False, verify=_tls()
        ) as client:
            request = client.build_request(
                method, pinned, params=query, json=body, headers=headers, extensions=extensions
            )
            response = client.send(request, stream=True)
            try:
                received = bytearray()
                cut = False
                for chunk in response.iter_bytes():
                    received += chunk
                    if len(received) > cap:
                        cut = True
                        break
                    if time.monotonic() > deadline:
                        raise httpx.ReadTimeout("deadline")
            finally:
                response.close()
    except httpx.TimeoutException:
        raise ToolError(f"the tool did not answer within {timeout:g}s") from None
    except httpx.HTTPError as exc:
        raise ToolError(f"the tool could not be reached ({type(exc).__name__})") from None
    text = bytes(received[:cap]).decode(response.encoding or "utf-8", errors="replace")
    if cut:
        text += f"\n[response cut at {cap} bytes]"
    return f"HTTP {response.status_code}\n{text}"
