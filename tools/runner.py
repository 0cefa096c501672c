"""Tools on the worker: an agent's tools as the model sees them, and executing the calls
the model asks for. Whatever a call returns or fails with is scrubbed of the project's
secrets before it goes anywhere (the model, the event stream, the run's steps, logs)."""

from __future__ import annotations

import base64
import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, quote_plus

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import connection
from jsonschema import Draft202012Validator
from referencing import Registry
from referencing.exceptions import Unresolvable

from agents.memory import MemoryEditRefused, memory_edit_by_agent
from agents.models import ProjectSecret, Tool
from agents.tool_validation import (
    AGENT_TOOL_PARAMETERS,
    BUILTIN_SPECS,
    TOOL_NAME,
    check_schema_shape,
)
from context.sparse import agent_search_mode
from context.vectors import citation, context_search, documents_store

from .http import ToolError, http_call
from .mcp import SEPARATOR, mcp_call, mcp_tools_cached
from .registry import tool_kind_executor

logger = logging.getLogger(__name__)

# Arguments are checked against their schema alone: a `$ref` that points outside it is
# not resolved, never fetched (jsonschema's default would GET any URL, past the egress
# guard, for a schema an MCP server lists).
SCHEMA_REFS = Registry()

SCRUBBED = "[secret]"
# Secrets shorter than this are not scrubbed from text: they would match everywhere.
MIN_SCRUBBED_LENGTH = 4


def _never() -> bool:
    return False


@dataclass(frozen=True)
class ToolSpec:
    name: str
    kind: str
    description: str
    parameters: dict[str, Any]
    safe_to_repeat: bool
    method: str = ""
    url_template: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    timeout: float = 0.0
    target_agent_id: str = ""
    # MCP: the server's tool it calls; for the server itself (kind "mcp-server", until
    # `tools_expand` lists it), the tool row and its version (the listing's cache key).
    remote_name: str = ""
    server_id: str = ""
    version: str = ""
    # A call waits for its owner's approval (the tool's own flag, or its kind is in
    # TOOL_APPROVAL_KINDS): chat stores the run meanwhile.
    requires_approval: bool = False

    def as_openai(self) -> dict[str, Any]:
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters or {"type": "object", "properties": {}},
            },
        }


@dataclass(frozen=True)
class ToolScope:
    """Who calls: the agent of a project of a user, and the project's secrets."""

    user_id: int
    project_id: uuid.UUID
    agent_id: str
    secrets: dict[str, str] = field(default_factory=dict)
    # The calling run (agent tools start runs under it), and whether it must stop.
    run_id: str = ""
    should_stop: Callable[[], bool] = _never
    # The calling run's deadline (time.monotonic()): a call waits at most what is left.
    deadline: float | None = None
    # The agent's params (its search mode, for search_context).
    params: dict[str, Any] = field(default_factory=dict)

    def timeout(self, default: float) -> float:
        if self.deadline is None:
            return default
        return max(0.1, min(default, self.deadline - time.monotonic()))


def agent_tools(*, agent_id: uuid.UUID | str, rows: list[Tool] | None = None) -> list[ToolSpec]:
    """The agent's tools (a database read), or those of `rows` (a pinned version's)."""

    specs = []
    if rows is None:
        rows = list(Tool.objects.filter(agent_id=agent_id).order_by("created_at", "id"))
    for tool in rows:
        if tool.kind == Tool.Kind.BUILTIN:
            builtin = BUILTIN_SPECS.get(tool.name)
            if builtin is None:
                continue
            specs.append(
                ToolSpec(
                    name=tool.name,
                    kind=tool.kind,
                    description=tool.description or builtin["description"],
                    parameters=builtin["parameters"],
                    safe_to_repeat=builtin["safe_to_repeat"],
                    requires_approval=_approval(tool),
                )
            )
        elif tool.kind == Tool.Kind.AGENT:
            specs.append(
                ToolSpec(
                    name=tool.name,
                    kind=tool.kind,
                    description=tool.description or "Ask another agent of this project.",
                    parameters=AGENT_TOOL_PARAMETERS,
                    safe_to_repeat=tool.safe_to_repeat,
                    target_agent_id=str(tool.target_agent_id),
                    requires_approval=_approval(tool),
                )
            )
        elif tool.kind == Tool.Kind.MCP:
            specs.append(
                ToolSpec(
                    name=tool.name,
                    kind="mcp-server",
                    description="",
                    parameters={},
                    safe_to_repeat=tool.safe_to_repeat,
                    url_template=tool.url_template,
                    headers=dict(tool.headers),
                    timeout=tool.timeout_seconds or settings.TOOL_TIMEOUT_SECONDS,
                    server_id=str(tool.id),
                    version=tool.updated_at.isoformat(),
                    requires_approval=_approval(tool),
                )
            )
        else:
            specs.append(
                ToolSpec(
                    name=tool.name,
                    kind=tool.kind,
                    description=tool.description,
                    parameters=tool.parameters,
                    safe_to_repeat=tool.safe_to_repeat,
                    method=tool.method,
                    url_template=tool.url_template,
                    headers=dict(tool.headers),
                    timeout=tool.timeout_seconds or settings.TOOL_TIMEOUT_SECONDS,
                    requires_approval=_approval(tool),
                )
            )
    return specs


def _approval(tool: Tool) -> bool:
    return tool.requires_approval or tool.kind in settings.TOOL_APPROVAL_KINDS


def tools_expand(specs: list[ToolSpec], *, redis, secrets: dict[str, str]) -> list[ToolSpec]:
    """`specs` with each MCP server replaced by its tools (listed, or from the project's
    cache). A server that cannot be listed is left out of this run, with a warning."""

    expanded = []
    for spec in specs:
        if spec.kind != "mcp-server":
            expanded.append(spec)
            continue
        try:
            listing = mcp_tools_cached(
                redis=redis,
                tool_id=spec.server_id,
                version=spec.version,
                url=spec.url_template,
                header_templates=spec.headers,
                secrets=secrets,
            )
        except ToolError as exc:
            logger.warning("MCP tool %s left out: %s", spec.name, scrub(str(exc), secrets))
            continue
        for remote in listing:
            name = f"{spec.name}{SEPARATOR}{remote['name']}"
            if not TOOL_NAME.match(name):
                continue  # a name the model could not call
            try:  # as a tool's own schema: no $ref outside it, no cycle, not too deep
                check_schema_shape(remote["parameters"])
            except (ValidationError, AttributeError, TypeError) as exc:
                why = exc.messages[0] if isinstance(exc, ValidationError) else "malformed"
                logger.warning("MCP tool %s left out: its schema: %s", name, why)
                continue
            expanded.append(
                ToolSpec(
                    name=name,
                    kind="mcp",
                    description=remote["description"],
                    parameters=remote["parameters"],
                    safe_to_repeat=spec.safe_to_repeat or remote["safe_to_repeat"],
                    url_template=spec.url_template,
                    headers=spec.headers,
                    timeout=spec.timeout,
                    remote_name=remote["name"],
                    requires_approval=spec.requires_approval,
                )
            )
    return expanded


def project_secrets(*, project_id: uuid.UUID | str) -> dict[str, str]:

    return dict(ProjectSecret.objects.filter(project_id=project_id).values_list("name", "value"))


def echo_forms(value: str) -> set[str]:
    """The forms in which a server that reflects its input can send a secret back: as
    is, JSON-escaped (ASCII or not), URL-encoded (path and form style), base64 (standard
    and URL-safe, padded or not)."""
    forms = {value, json.dumps(value)[1:-1], json.dumps(value, ensure_ascii=False)[1:-1]}
    forms |= {quote(value, safe=""), quote_plus(value), quote(value)}
    raw = value.encode("utf-8", "surrogatepass")
    for encoded in (base64.b64encode(raw), base64.urlsafe_b64encode(raw)):
        text = encoded.decode()
        forms |= {text, text.rstrip("=")}
    return {form for form in forms if len(form) >= MIN_SCRUBBED_LENGTH}


def scrub(text: str, secrets: dict[str, str]) -> str:
    forms = set()
    for value in secrets.values():
        if len(value) >= MIN_SCRUBBED_LENGTH:
            forms |= echo_forms(value)
    for form in sorted(forms, key=len, reverse=True):
        text = text.replace(form, SCRUBBED)
    return text


@dataclass
class ToolOutcome:
    ok: bool
    content: str
    # What else the run's step and event show of the call (an agent call's run).
    extra: dict[str, Any] = field(default_factory=dict)


def tool_arguments(*, spec: ToolSpec | None, arguments: str) -> dict[str, Any] | ToolOutcome:
    """The call's arguments parsed and checked against the tool's schema, or the failed
    outcome the model is told."""
    if spec is None:
        return ToolOutcome(False, "error: no such tool")
    try:
        args = json.loads(arguments or "{}")
    except ValueError:
        return ToolOutcome(False, "error: the arguments are not valid JSON")
    if not isinstance(args, dict):
        return ToolOutcome(False, "error: the arguments must be a JSON object")
    problem = arguments_problem(spec.parameters, args)
    if problem:
        return ToolOutcome(False, f"error: invalid arguments: {problem}")
    return args


def tool_execute(*, spec: ToolSpec | None, arguments: str, scope: ToolScope) -> ToolOutcome:
    """Run one call; never raises. `arguments` is the JSON text the model wrote."""
    args = tool_arguments(spec=spec, arguments=arguments)
    if isinstance(args, ToolOutcome):
        return args
    try:
        executor = tool_kind_executor(spec.kind)
        if executor is not None:  # a kind another app runs (agent: chat.calls)
            ok, content, extra = executor(spec=spec, arguments=args, scope=scope)
            return ToolOutcome(ok, scrub(content, scope.secrets), extra)
        if spec.kind == "mcp":
            ok, content = mcp_call(
                url=spec.url_template,
                header_templates=spec.headers,
                secrets=scope.secrets,
                name=spec.remote_name,
                arguments=args,
                timeout=scope.timeout(spec.timeout),
            )
            return ToolOutcome(ok, scrub(content, scope.secrets))
        if spec.kind == "builtin" and spec.name in MEMORY_TOOLS:
            return _memory_tool(spec.name, args, scope)
        if spec.kind == "builtin" and spec.name == "search_context":
            return _search_tool(args, scope)
        if spec.kind == "builtin":
            content = _builtin(spec.name, args, scope)
        else:
            content = http_call(
                method=spec.method,
                url_template=spec.url_template,
                header_templates=spec.headers,
                arguments=args,
                secrets=scope.secrets,
                timeout=scope.timeout(spec.timeout),
            )
        return ToolOutcome(True, scrub(content, scope.secrets))
    except ToolError as exc:
        return ToolOutcome(False, "error: " + scrub(str(exc), scope.secrets))
    except Exception as exc:
        logger.warning("tool %s failed: %s", spec.name, type(exc).__name__)
        return ToolOutcome(False, f"error: the tool failed ({type(exc).__name__})")


def arguments_problem(schema: dict[str, Any], args: dict[str, Any]) -> str:
    """Why `args` do not fit the JSON schema `schema` (the first problem), or ""."""

    if not schema:
        return ""
    try:
        validator = Draft202012Validator(schema, registry=SCHEMA_REFS)
        error = next(iter(validator.iter_errors(args)), None)
    except RecursionError:  # a schema stored before such schemas were refused, or MCP's
        return "the tool's parameters schema is recursive; it cannot be checked"
    except Unresolvable as exc:
        return f"the tool's parameters schema refers outside itself ({exc.ref!r})"
    if error is None:
        return ""
    where = "/".join(str(p) for p in error.path)
    return f"{where}: {error.message}" if where else error.message


MEMORY_TOOLS = ("memory_append", "memory_replace")


def _memory_tool(name: str, args: dict[str, Any], scope: ToolScope) -> ToolOutcome:
    """The agent edits one of its memory blocks; `extra.memory` makes the run's stream
    say `memory.updated` (chat.toolloop)."""
    try:
        block = memory_edit_by_agent(
            agent_id=scope.agent_id,
            label=args["label"],
            action=name.removeprefix("memory_"),
            run_id=scope.run_id,
            content=args.get("content", ""),
            old=args.get("old_content", ""),
            new=args.get("new_content", ""),
        )
    except MemoryEditRefused as exc:
        return ToolOutcome(False, f"error: {exc}")
    finally:
        # The call ran in a tool thread: its database connection goes with it.
        connection.close()
    memory = {"label": block.label, "action": name.removeprefix("memory_"),
              "chars": len(block.value), "limit": block.limit}  # fmt: skip
    return ToolOutcome(True, json.dumps({"ok": True, **memory}), {"memory": memory})


def _search_tool(args: dict[str, Any], scope: ToolScope) -> ToolOutcome:
    """search_context: the hits for the model (with their source, page and section),
    and their citations for the answer (`extra.citations`, kept in the run's step)."""
    hits = context_search(
        user_id=scope.user_id,
        project_id=scope.project_id,
        agent_id=scope.agent_id,
        query=args["query"],
        k=int(args.get("k", 4)),
        mode=args.get("mode") or agent_search_mode(scope.params),
    )
    found = [{"id": h.id, "score": round(h.score, 4), **citation(h)} for h in hits]
    content = json.dumps(
        [
            {"text": h.text, **{k: v for k, v in cite.items() if k != "id"}}  # and score
            for h, cite in zip(hits, found, strict=True)
        ],
        ensure_ascii=False,
    )
    return ToolOutcome(True, scrub(content, scope.secrets), {"citations": found})


def _builtin(name: str, args: dict[str, Any], scope: ToolScope) -> str:

    if name == "add_context":
        stored = documents_store(
            user_id=scope.user_id,
            project_id=scope.project_id,
            agent_id=scope.agent_id,
            documents=[{"text": args["text"], "metadata": {"source": "tool"}}],
        )
        return json.dumps({"stored_chunks": stored or 0})
    raise ToolError(f"no built-in tool {name!r}")
