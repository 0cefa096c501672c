"""Request body parsers that turn every malformed or hostile body into a 400 or a 413.

What a JSON body may not hold here, because something downstream cannot store or even
walk it: nesting deeper than MAX_JSON_DEPTH (a few thousand levels overflow Python's
recursion, before any serializer runs), NUL characters (PostgreSQL text and JSONB refuse
them) and lone UTF-16 surrogates such as "\\ud800" (not encodable as UTF-8). Each is a
400 naming the top-level field that holds it, and nothing is written.
"""

from __future__ import annotations

import io
import json
import math
import re
from typing import Any

from django.conf import settings
from rest_framework import parsers
from rest_framework.exceptions import ParseError, ValidationError

from .exceptions import PayloadTooLarge

MAX_JSON_DEPTH = 32
_BAD_CHARACTERS = re.compile("[\x00\ud800-\udfff]")
# A JSON string token, or a bracket: enough to follow the nesting of a body that
# json.loads could not (see _too_deep_at).
_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.DOTALL)


def max_body_bytes() -> int:
    return settings.DATA_UPLOAD_MAX_MEMORY_SIZE


def read_body(stream, parser_context: dict | None) -> bytes:
    """The raw body, refused with a 413 past DATA_UPLOAD_MAX_MEMORY_SIZE (DRF reads the
    request stream itself, so Django's own limit never applies to a JSON body)."""
    limit = max_body_bytes()
    request = (parser_context or {}).get("request")
    meta = getattr(request, "META", {}) if request is not None else {}
    try:
        declared = int(meta.get("CONTENT_LENGTH") or 0)
    except ValueError:
        declared = 0
    if declared > limit:
        raise PayloadTooLarge(f"The request body is larger than {limit} bytes.")
    if stream is None:
        return b""
    body = stream.read(limit + 1)
    if len(body) > limit:
        raise PayloadTooLarge(f"The request body is larger than {limit} bytes.")
    return body


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _problem(value: Any, depth: int = 1) -> str | None:
    """Why a parsed value (at this depth of the body) cannot be accepted, or None.
    Iterative: no recursion to overflow."""
    stack = [(value, depth)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            return f"Nested deeper than {MAX_JSON_DEPTH} levels."
        if isinstance(item, str):
            found = _BAD_CHARACTERS.search(item)
            if found:
                return _describe(found.group())
        elif isinstance(item, float) and not math.isfinite(item):
            # 1e309 parses as infinity: nothing downstream (JSON out, the vector store,
            # PostgreSQL's jsonb) can hold it.
            return "Numbers must fit a 64-bit float: one here is too large."
        elif isinstance(item, dict):
            for key, inner in item.items():
                found = _BAD_CHARACTERS.search(key)
                if found:
                    return _describe(found.group())
                stack.append((inner, depth + 1))
        elif isinstance(item, list):
            stack.extend((inner, depth + 1) for inner in item)
    return None


def _describe(character: str) -> str:
    if character == "\x00":
        return "Null characters are not allowed."
    return f"Lone surrogate characters are not allowed: U+{ord(character):04X}."


def _too_deep_at(text: str) -> str | None:
    """The top-level key under which a body that json.loads could not parse for its depth
    nests too deep (None if the root itself does). The last string seen at depth 1 before
    the nesting is that key: a value string at depth 1 is never directly followed by one."""
    depth, key = 0, None
    for token in _TOKENS.finditer(text):
        t = token.group()
        if t in "[{":
            depth += 1
            if depth > MAX_JSON_DEPTH:
                return key
        elif t in "]}":
            depth -= 1
        elif depth == 1:
            key = json.loads(t)
    return key


def _printable(key: str) -> str:
    """A key as the error names it: a lone surrogate escaped, so the answer is valid UTF-8."""
    return key.encode("utf-8", "backslashreplace").decode("utf-8")


class JSONParser(parsers.JSONParser):
    """DRF's JSON parser, with the limits above and a 413 for an oversized body."""

    def parse(self, stream, media_type=None, parser_context=None):
        parser_context = parser_context or {}
        encoding = parser_context.get("encoding", settings.DEFAULT_CHARSET)
        raw = read_body(stream, parser_context)
        try:
            text = raw.decode(encoding)
        except (UnicodeDecodeError, LookupError) as exc:
            raise ParseError(f"The body is not valid {encoding}: {exc}") from None
        try:
            data = json.loads(text, parse_constant=_reject_constant)
        except RecursionError:
            message = f"Nested deeper than {MAX_JSON_DEPTH} levels."
            key = _too_deep_at(text)
            if key is None:
                raise ParseError(f"JSON parse error - {message}") from None
            raise ValidationError({_printable(key): [message]}) from None
        except ValueError as exc:
            raise ParseError(f"JSON parse error - {exc}") from None
        if isinstance(data, dict):
            for key, value in data.items():
                problem = _problem(key) or _problem(value, depth=2)
                if problem:
                    raise ValidationError({_printable(key): [problem]})
        else:
            problem = _problem(data)
            if problem:
                raise ParseError(f"JSON parse error - {problem}")
        return data


class FormParser(parsers.FormParser):
    """DRF's form parser (for clients that post `-d username=...`), with the same 413."""

    def parse(self, stream, media_type=None, parser_context=None):
        raw = read_body(stream, parser_context)
        return super().parse(io.BytesIO(raw), media_type, parser_context)
