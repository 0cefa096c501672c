"""The one door out: every URL a tenant can set (HTTP tools, MCP servers, a project's
LLM endpoint, anything later such as webhooks) leaves the process through here.

- The host is resolved once and every address it resolves to is checked: IPv4, and
  IPv6 with the IPv4 it may carry (IPv4-mapped, IPv4-compatible, NAT64 `64:ff9b::/96`,
  6to4 `2002::/16`, Teredo). Loopback, private, shared, link-local, site-local,
  unique-local, multicast, reserved and unspecified addresses are refused, and so is
  the local-use NAT64 prefix `64:ff9b:1::/48` (what it embeds is site-defined).
- The connection goes to the checked address (the Host header and TLS SNI keep the
  name), so a DNS answer that changes between check and connect (rebinding) cannot
  redirect it. Clients built here follow no redirect.
- An operator opens it per purpose for their own networks: `EGRESS_ALLOW_NETWORKS`
  maps a purpose (`tools`, `mcp`, `provider`, `webhooks`) to CIDRs whose addresses are let through
  (settings: `EGRESS_ALLOW_NETWORKS_TOOLS=10.0.0.0/8,...`). The deployment's own LLM
  endpoint (OPENAI_BASE_URL) is the operator's and does not come through here.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import socket
from collections.abc import Iterable
from urllib.parse import urlsplit

import httpx
from django.conf import settings
from django.core import checks

TOOLS, MCP, PROVIDER, WEBHOOKS = "tools", "mcp", "provider", "webhooks"
# Files an agent's context fetches by URL (context.jobs).
FILES = "files"
PURPOSES = (TOOLS, MCP, PROVIDER, WEBHOOKS, FILES)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
_SHARED_V4 = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT


class EgressRefused(Exception):
    """The destination may not be reached for this purpose; str() says why (safe to
    show the tenant: it names their own host and the kind of address, nothing more)."""


class EgressUnresolvable(EgressRefused):
    """The host does not resolve."""


def embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address carries, by the transition forms that route
    to them."""
    found = []
    if ip.ipv4_mapped is not None:
        found.append(ip.ipv4_mapped)
    if ip in _IPV4_COMPATIBLE or ip in _NAT64:
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    if ip.sixtofour is not None:
        found.append(ip.sixtofour)
    if ip.teredo is not None:
        found.extend(ip.teredo)
    return found


def _public(ip: IPAddress) -> bool:
    if (
        ip.is_loopback
        or ip.is_private
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
        or not ip.is_global
    ):
        return False
    if isinstance(ip, ipaddress.IPv4Address):
        return ip not in _SHARED_V4
    return not ip.is_site_local and ip not in _NAT64_LOCAL


def address_refusal(address: str | IPAddress) -> str | None:
    """What makes an address non-public (the address, and what it embeds), or None when
    it and every IPv4 address it carries are public."""
    ip = ipaddress.ip_address(str(address).split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        if ip in _NAT64_LOCAL:
            return f"{ip}, local-use NAT64"
        for inner in embedded_ipv4(ip):
            if not _public(inner):
                return f"{ip}, which carries {inner}"
    if not _public(ip):
        return str(ip)
    return None


@functools.lru_cache(maxsize=32)
def _networks(entries: tuple[str, ...]) -> tuple:
    return tuple(ipaddress.ip_network(e.strip(), strict=False) for e in entries if e.strip())


def allowed_networks(purpose: str) -> tuple:
    """The networks the operator opened for `purpose` (read now: settings may change)."""
    configured = getattr(settings, "EGRESS_ALLOW_NETWORKS", {}) or {}
    entries: Iterable[str] = configured.get(purpose, ())
    if isinstance(entries, str):
        entries = entries.split(",")
    entries = tuple(entries)
    if purpose in (TOOLS, MCP) and settings.TOOLS_ALLOW_PRIVATE_NETWORKS:
        entries += ("0.0.0.0/0", "::/0")  # the older, wider switch
    return _networks(entries)


def address_allowed(address: str, *, purpose: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if any(ip.version == net.version and ip in net for net in allowed_networks(purpose)):
        return True
    return address_refusal(ip) is None


def resolve_checked(host: str, port: int, *, purpose: str) -> str:
    """The address to connect to for `host`: every address it resolves to must be
    public or in a network the operator opened for `purpose`; raises EgressRefused."""
    if purpose not in PURPOSES:
        raise ValueError(f"unknown egress purpose {purpose!r}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        raise EgressUnresolvable(f"the host {host!r} could not be resolved") from None
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    if not addresses:
        raise EgressUnresolvable(f"the host {host!r} could not be resolved")
    for address in addresses:
        if not address_allowed(address, purpose=purpose):
            detail = address_refusal(address) or address
            raise EgressRefused(
                f"refused: {host!r} resolves to a non-public address ({detail}); only "
                "public addresses may be reached from here"
            )
    return addresses[0]


def check_url(url: str, *, purpose: str) -> tuple[str, int, str]:
    """(host, port, checked address) of an http(s) URL; raises EgressRefused."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise EgressRefused("not an http(s) URL")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.hostname, port, resolve_checked(parts.hostname, port, purpose=purpose)


def _pin(request, address: str) -> None:
    """Point `request` at the checked address; its Host header (set when the request
    was built) and the TLS server name keep the original host."""
    host = request.url.host
    request.url = request.url.copy_with(host=address)
    if request.url.scheme == "https":
        request.extensions = {**request.extensions, "sni_hostname": host}


def _port(url) -> int:
    return url.port or (443 if url.scheme == "https" else 80)


class AnswerRefused(Exception):
    """An answer its client does not take: past the bytes it takes, or compressed when
    it asked for none (str(): which)."""


def _uncompressed(response, request, httpx_module) -> None:
    """Raise (a decoding error caused by AnswerRefused) unless the answer came as it
    was asked for: uncompressed, so the bytes counted are the bytes held."""
    encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        cause = AnswerRefused(f"a compressed answer ({encoding}) was not asked for")
        raise httpx_module.DecodingError(str(cause), request=request) from cause


class _LineBounded(httpx.SyncByteStream):
    """An answer's body whose lines may not pass `limit` bytes (a read error caused by
    AnswerRefused): a line is what a streaming client holds until it ends."""

    def __init__(self, stream, request: httpx.Request, limit: int) -> None:
        self._stream, self._request, self._limit = stream, request, limit

    def __iter__(self):
        line = 0
        for chunk in self._stream:
            end = chunk.rfind(b"\n")
            line = len(chunk) - end - 1 if end >= 0 else line + len(chunk)
            if line > self._limit:
                cause = AnswerRefused(f"a line of the answer passed {self._limit} bytes")
                raise httpx.ReadError(str(cause), request=self._request) from cause
            yield chunk

    def close(self) -> None:
        self._stream.close()


class GuardedTransport(httpx.HTTPTransport):
    """An httpx transport that checks and pins every request it sends; with
    `max_line_bytes`, its answers come uncompressed, with lines of at most that many
    bytes."""

    def __init__(self, *, purpose: str, max_line_bytes: int | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.purpose = purpose
        self.max_line_bytes = max_line_bytes

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        try:
            address = resolve_checked(request.url.host, _port(request.url), purpose=self.purpose)
        except EgressRefused as exc:
            # A connection error to the client (so it ends the call as one); the
            # refusal stays its cause for whoever explains the failure.
            raise httpx.ConnectError(str(exc), request=request) from exc
        _pin(request, address)
        if self.max_line_bytes is None:
            return super().handle_request(request)
        request.headers["Accept-Encoding"] = "identity"
        response = super().handle_request(request)
        try:
            _uncompressed(response, request, httpx)
        except httpx.DecodingError:
            response.close()
            raise
        response.stream = _LineBounded(response.stream, request, self.max_line_bytes)
        return response


def guarded_client(*, purpose: str, max_line_bytes: int | None = None, **kwargs) -> httpx.Client:
    """A sync httpx client whose every request is checked and pinned; no redirects.
    `max_line_bytes`: see GuardedTransport."""
    transport = GuardedTransport(
        purpose=purpose, max_line_bytes=max_line_bytes, verify=kwargs.pop("verify", True)
    )
    return httpx.Client(
        transport=transport,
        follow_redirects=False,
        trust_env=False,  # no proxy from the environment: it would connect for us
        **kwargs,
    )


def guarded_async_client_factory(
    *, purpose: str, httpx_module, max_answer_bytes: int | None = None
):
    """A factory of async clients (of `httpx_module`: httpx, or the mcp SDK's httpx2)
    whose every request is checked and pinned; with the mcp SDK's factory signature.
    With `max_answer_bytes`, an answer's body is cut past that many bytes (a read error
    caused by AnswerRefused), and asked for and taken uncompressed only, so the bytes
    counted are the bytes held."""

    class Bounded(httpx_module.AsyncByteStream):
        def __init__(self, stream, request) -> None:
            self._stream, self._request = stream, request

        async def __aiter__(self):
            seen = 0
            async for chunk in self._stream:
                seen += len(chunk)
                if seen > max_answer_bytes:
                    cause = AnswerRefused(f"the answer passed {max_answer_bytes} bytes")
                    raise httpx_module.ReadError(str(cause), request=self._request) from cause
                yield chunk

        async def aclose(self) -> None:
            await self._stream.aclose()

    class AsyncGuardedTransport(httpx_module.AsyncHTTPTransport):
        async def handle_async_request(self, request):
            try:
                address = await asyncio.to_thread(
                    resolve_checked, request.url.host, _port(request.url), purpose=purpose
                )
            except EgressRefused as exc:
                raise httpx_module.ConnectError(str(exc), request=request) from exc
            _pin(request, address)
            if max_answer_bytes is None:
                return await super().handle_async_request(request)
            request.headers["Accept-Encoding"] = "identity"
            response = await super().handle_async_request(request)
            try:
                _uncompressed(response, request, httpx_module)
            except httpx_module.DecodingError:
                await response.aclose()
                raise
            response.stream = Bounded(response.stream, request)
            return response

    def factory(headers=None, timeout=None, auth=None):
        kwargs = {"headers": headers, "timeout": timeout, "auth": auth}
        return httpx_module.AsyncClient(
            transport=AsyncGuardedTransport(),
            follow_redirects=False,
            trust_env=False,
            **{k: v for k, v in kwargs.items() if v is not None},
        )

    return factory


@checks.register(checks.Tags.security)
def check_allowed_networks(app_configs=None, **kwargs) -> list[checks.CheckMessage]:
    """A malformed EGRESS_ALLOW_NETWORKS_* entry fails the checks, not the first call."""
    errors = []
    for purpose in PURPOSES:
        try:
            allowed_networks(purpose)
        except ValueError as exc:
            errors.append(
                checks.Error(f"EGRESS_ALLOW_NETWORKS_{purpose.upper()}: {exc}", id="common.E001")
            )
    return errors
