"""Validation of tools and project secrets, shared by the API and the admin (one rule,
two doors). Raises Django's ValidationError; DRF's validators turn it into a 400."""

from __future__ import annotations

import json
import re
import string
from typing import Any
from urllib.parse import urlsplit

from django.core.exceptions import ValidationError
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

# OpenAI's rule for function names.
TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
SECRET_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
# A header value refers to a secret as {{secret:NAME}}.
SECRET_REF = re.compile(r"\{\{secret:([^{}]*)\}\}")
HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,100}$")
MAX_SCHEMA_BYTES = 16 * 1024
# How deep a tool's parameters schema may nest (objects and arrays); checking arguments
# walks it recursively.
MAX_SCHEMA_DEPTH = 32
LOCAL_REF = re.compile(r"^#/(\$defs|definitions)/([^/~]+)$")
MAX_HEADERS = 20
MAX_HEADER_VALUE = 4096
# Headers the HTTP client sets itself.
RESERVED_HEADERS = {"host", "content-length", "transfer-encoding", "connection"}

BUILTIN_TOOLS = ("search_context", "add_context", "memory_append", "memory_replace")
# An MCP tool's name prefixes its server's tool names (`<prefix>__<name>`, 64 at most).
MCP_PREFIX_MAX = 20


def validate_tool_name(value) -> None:
    if not isinstance(value, str) or not TOOL_NAME.match(value):
        raise ValidationError("Must be 1 to 64 letters, digits, '_' or '-'.")


def validate_secret_name(value) -> None:
    if not isinstance(value, str) or not SECRET_NAME.match(value):
        raise ValidationError(
            "Must start with a letter or '_' and hold at most 64 letters, digits or '_'."
        )


def validate_parameters_schema(value) -> None:
    """A tool's parameters: a JSON Schema (draft 2020-12) of an object."""
    if not isinstance(value, dict):
        raise ValidationError("Must be a JSON object (a JSON Schema).")
    if len(json.dumps(value).encode()) > MAX_SCHEMA_BYTES:
        raise ValidationError(f"Must be at most {MAX_SCHEMA_BYTES} bytes as JSON.")
    if value and value.get("type") != "object":
        raise ValidationError('Must describe an object: "type": "object".')
    check_schema_shape(value)
    try:
        Draft202012Validator.check_schema(value)
    except SchemaError as exc:
        path = "/".join(str(p) for p in exc.path)
        raise ValidationError(
            f"Not a valid JSON Schema: {exc.message}" + (f" (at {path})" if path else "")
        ) from None
    except RecursionError:
        raise ValidationError("Not a valid JSON Schema: it nests too deeply.") from None


def check_schema_shape(schema: dict) -> None:
    """What would make checking a call's arguments recurse without end or reach outside:
    nesting past MAX_SCHEMA_DEPTH, a `$ref` that is not to `#/$defs/<name>` (or
    `definitions`), dynamic references, and references that form a cycle."""
    definitions: dict[str, set[str]] = {}
    root_refs = _refs(schema, depth=0, skip_defs=True)
    for section in ("$defs", "definitions"):
        for name, sub in (schema.get(section) or {}).items():
            definitions[f"{section}/{name}"] = _refs(sub, depth=1, skip_defs=False)
    for target in root_refs | {t for refs in definitions.values() for t in refs}:
        if target not in definitions:
            raise ValidationError(f"$ref to {target!r}: no such definition.")
    # A cycle among definitions makes the schema recursive: refused.
    state: dict[str, int] = {}

    def visit(name: str) -> None:
        state[name] = 1
        for target in definitions[name]:
            if state.get(target) == 1:
                raise ValidationError(f"Recursive schema: {target!r} refers back to itself.")
            if target not in state:
                visit(target)
        state[name] = 2

    for name in definitions:
        if name not in state:
            visit(name)


def _refs(node, *, depth: int, skip_defs: bool) -> set[str]:
    if depth > MAX_SCHEMA_DEPTH:
        raise ValidationError(f"Nests deeper than {MAX_SCHEMA_DEPTH} levels.")
    found: set[str] = set()
    if isinstance(node, list):
        for item in node:
            found |= _refs(item, depth=depth + 1, skip_defs=False)
        return found
    if not isinstance(node, dict):
        return found
    for key in ("$dynamicRef", "$recursiveRef"):
        if key in node:
            raise ValidationError(f"{key} is not supported: use $ref to #/$defs/<name>.")
    ref = node.get("$ref")
    if ref is not None:
        match = LOCAL_REF.match(ref) if isinstance(ref, str) else None
        if match is None:
            raise ValidationError(
                f"$ref {ref!r} is not supported: only references to #/$defs/<name>."
            )
        found.add(f"{match.group(1)}/{match.group(2)}")
    for key, value in node.items():
        if skip_defs and key in ("$defs", "definitions"):
            continue
        found |= _refs(value, depth=depth + 1, skip_defs=False)
    return found


def url_placeholders(template: str) -> list[str]:
    """The `{name}` fields of a URL template; raises ValueError on a malformed one."""
    names = []
    for _text, field, spec, conversion in string.Formatter().parse(template):
        if field is None:
            continue
        if not field.isidentifier() or spec or conversion:
            raise ValueError(f"bad placeholder {{{field}}}")
        names.append(field)
    return names


def validate_url_template(value) -> None:
    """An absolute http(s) URL whose placeholders (`{name}`) sit in its path or query."""
    if not value:
        return
    if not isinstance(value, str):
        raise ValidationError("Must be a string.")
    try:
        url_placeholders(value)
        parts = urlsplit(value)
    except ValueError as exc:
        raise ValidationError(f"Not a valid URL template: {exc}.") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValidationError("Must be an absolute http:// or https:// URL.")
    if "{" in parts.netloc or "}" in parts.netloc:
        raise ValidationError("The host cannot hold placeholders.")
    if parts.username or parts.password:
        raise ValidationError("Must not hold credentials; use headers and secrets.")


def validate_header_templates(value) -> None:
    """{"Header-Name": "value, with {{secret:NAME}} where a secret goes"}."""
    if not isinstance(value, dict):
        raise ValidationError("Must be a JSON object of header names to values.")
    if len(value) > MAX_HEADERS:
        raise ValidationError(f"At most {MAX_HEADERS} headers.")
    errors = []
    for name, template in value.items():
        if not HEADER_NAME.match(name) or name.lower() in RESERVED_HEADERS:
            errors.append(f"{name!r}: not a header name a tool may set.")
        elif not isinstance(template, str) or len(template) > MAX_HEADER_VALUE:
            errors.append(f"{name}: must be a string of at most {MAX_HEADER_VALUE} characters.")
        elif any(c in template for c in "\r\n\0"):
            errors.append(f"{name}: must not hold line breaks.")
        else:
            for ref in SECRET_REF.findall(template):
                if not SECRET_NAME.match(ref):
                    errors.append(f"{name}: {{{{secret:{ref}}}}} names no valid secret.")
    if errors:
        raise ValidationError(errors)


def validate_http_tool(*, parameters: dict, method: str, url_template: str) -> None:
    """What an HTTP tool needs as a whole: a method, a URL, and every URL placeholder a
    declared parameter."""
    errors: dict[str, list[str]] = {}
    if not method:
        errors["method"] = ["An HTTP tool needs a method."]
    if not url_template:
        errors["url_template"] = ["An HTTP tool needs a URL template."]
    else:
        declared = set((parameters or {}).get("properties") or {})
        missing = [n for n in url_placeholders(url_template) if n not in declared]
        if missing:
            errors["url_template"] = [
                f"Placeholders not among the parameters' properties: {', '.join(missing)}."
            ]
    if errors:
        raise ValidationError(errors)


def validate_tool(data: dict) -> None:
    """A tool as a whole (after a partial update, its merged fields): a built-in one
    names a built-in and takes no HTTP field; an agent one names another agent (of the
    same project: the caller checks); an HTTP one is `validate_http_tool`."""
    if data.get("kind") != "agent" and data.get("target_agent"):
        raise ValidationError({"target_agent_id": ["Only agent tools take this field."]})
    if data.get("kind") == "builtin":
        if data.get("name") not in BUILTIN_TOOLS:
            raise ValidationError(
                {"name": [f"No such built-in tool; there are: {', '.join(BUILTIN_TOOLS)}."]}
            )
        extra = [f for f in ("method", "url_template", "headers") if data.get(f)]
        if extra:
            raise ValidationError({f: ["Only HTTP tools take this field."] for f in extra})
        return
    if data.get("kind") == "mcp":
        errors = {}
        url = data.get("url_template") or ""
        if not url:
            errors["url_template"] = ["An MCP tool needs its server's URL."]
        elif url_placeholders(url):
            errors["url_template"] = ["An MCP server's URL takes no placeholders."]
        if data.get("method"):
            errors["method"] = ["Only HTTP tools take this field."]
        if len(data.get("name") or "") > MCP_PREFIX_MAX:
            errors["name"] = [f"An MCP tool's name is a prefix of at most {MCP_PREFIX_MAX}."]
        if errors:
            raise ValidationError(errors)
        return
    if data.get("kind") == "agent":
        errors = {}
        if not data.get("target_agent"):
            errors["target_agent_id"] = ["An agent tool needs the agent it asks."]
        elif data.get("agent") is not None and data["target_agent"] == data["agent"]:
            errors["target_agent_id"] = ["An agent cannot call itself."]
        extra = [f for f in ("method", "url_template", "headers") if data.get(f)]
        errors.update({f: ["Only HTTP tools take this field."] for f in extra})
        if errors:
            raise ValidationError(errors)
        return
    validate_http_tool(
        parameters=data.get("parameters") or {},
        method=data.get("method") or "",
        url_template=data.get("url_template") or "",
    )


# What the built-in tools do and take, as the model is told (executed by tools.runner).
BUILTIN_SPECS: dict[str, dict[str, Any]] = {
    "search_context": {
        "description": "Search this agent's context memory for passages relevant to a query.",
        "parameters": {
            "type": "object",
            "properties": {
                "query": {"type": "string", "description": "What to look for."},
                "k": {"type": "integer", "minimum": 1, "maximum": 20, "default": 4},
                "mode": {
                    "type": "string",
                    "enum": ["dense", "sparse", "hybrid"],
                    "description": "sparse or hybrid find exact identifiers, codes and "
                    "numbers; dense finds meaning. Default: the agent's search mode.",
                },
            },
            "required": ["query"],
            "additionalProperties": False,
        },
        # A read.
        "safe_to_repeat": True,
    },
    "add_context": {
        "description": "Remember a piece of text in this agent's context memory.",
        "parameters": {
            "type": "object",
            "properties": {"text": {"type": "string", "minLength": 1, "maxLength": 20000}},
            "required": ["text"],
            "additionalProperties": False,
        },
        # Points are keyed by their text: storing the same text twice stores it once.
        "safe_to_repeat": True,
    },
    "memory_append": {
        "description": "Add a line to one of your memory blocks (they are in your system "
        "prompt, under <memory_blocks>). Keep within the block's limit.",
        "parameters": {
            "type": "object",
            "properties": {
                "label": {"type": "string", "minLength": 1, "maxLength": 64},
                "content": {"type": "string", "minLength": 1, "maxLength": 20000},
            },
            "required": ["label", "content"],
            "additionalProperties": False,
        },
        # Appending twice adds the line twice.
        "safe_to_repeat": False,
    },
    "memory_replace": {
        "description": "Replace text that occurs exactly once in one of your memory "
        "blocks with new text (empty new_content deletes it).",
        "parameters": {
            "type": "object",
            "properties": {
                "label": {"type": "string", "minLength": 1, "maxLength": 64},
                "old_content": {"type": "string", "minLength": 1, "maxLength": 20000},
                "new_content": {"type": "string", "maxLength": 20000},
            },
            "required": ["label", "old_content", "new_content"],
            "additionalProperties": False,
        },
        # A second replace finds the old text gone and is refused: no harm.
        "safe_to_repeat": True,
    },
}


# What the model gives an agent tool: the message for the agent it asks.
AGENT_TOOL_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {
        "message": {
            "type": "string",
            "minLength": 1,
            "maxLength": 32000,
            "description": "What to ask the agent.",
        }
    },
    "required": ["message"],
    "additionalProperties": False,
}
