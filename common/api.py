"""Pieces every API of the project shares: strict input serializers, the list envelope,
and the one shape of every error the API answers.

Every 4xx/5xx body, from a DRF view, a plain view or Django itself, is

    {"detail": "<what went wrong, for people>", "code": "<what went wrong, for programs>",
     "<field>": ["<message>", ...], ...}

where the field keys appear on validation errors only (a 400 names each bad field or
parameter; DRF's own convention, so DRF clients read it as they always have).
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

import kombu.exceptions
import redis
from django.conf import settings
from django.core.exceptions import PermissionDenied, RequestDataTooBig
from django.core.validators import RegexValidator
from django.db import InterfaceError, InternalError, OperationalError
from django.http import Http404, JsonResponse
from psycopg.errors import ReadOnlySqlTransaction
from rest_framework import exceptions, serializers, status
from rest_framework.exceptions import APIException
from rest_framework.pagination import LimitOffsetPagination
from rest_framework.response import Response
from rest_framework.settings import api_settings
from rest_framework.views import exception_handler as drf_exception_handler

from .exceptions import BackendUnavailable, Conflict, FieldNotFound, PayloadTooLarge

__all__ = ["BackendUnavailable", "Conflict", "FieldNotFound", "PayloadTooLarge"]

logger = logging.getLogger(__name__)

MAX_PAGE_LIMIT = 200
DEFAULT_PAGE_LIMIT = 50
# The largest offset a list takes: beyond a database's integer range a query would fail.
MAX_PAGE_OFFSET = 2**31 - 1


class StrictSerializer(serializers.Serializer):
    """An input serializer that rejects fields it does not know, instead of ignoring them."""

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        unknown = set(getattr(self, "initial_data", {}) or {}) - set(self.fields)
        if unknown:
            raise serializers.ValidationError(
                {name: ["Unknown field."] for name in sorted(unknown)}
            )
        return attrs


# "Not blank": holds a character other than ASCII whitespace. Spelled out rather than
# `\S`, which Python and the ECMA regexes of OpenAPI tools read differently (e.g. U+001F).
NOT_BLANK = r"[^ \t\n\r\f\v]"


class TextField(serializers.CharField):
    """Text input as the schema says it: a JSON string (DRF would turn 5 into "5"), kept
    as given (not trimmed, so the length the schema documents is the length checked).
    Unless `allow_blank`, it must hold a non-space character (the schema's `pattern`,
    NOT_BLANK)."""

    default_error_messages = {"invalid": "Must be a string."}

    def __init__(self, **kwargs):
        kwargs.setdefault("trim_whitespace", False)
        super().__init__(**kwargs)
        if not self.allow_blank:
            self.validators.append(RegexValidator(NOT_BLANK, "Must not be blank."))

    def to_internal_value(self, data):
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


class UUIDField(serializers.UUIDField):
    """A UUID as the schema says it: a string (DRF would also take an integer)."""

    def to_internal_value(self, data):
        if not isinstance(data, str):
            self.fail("invalid", value=data)
        return super().to_internal_value(data)


class _PageQuerySerializer(serializers.Serializer):
    limit = serializers.IntegerField(
        min_value=1, max_value=MAX_PAGE_LIMIT, default=DEFAULT_PAGE_LIMIT
    )
    offset = serializers.IntegerField(min_value=0, max_value=MAX_PAGE_OFFSET, default=0)


class EnvelopePagination(LimitOffsetPagination):
    """DRF's limit/offset pagination in this API's list shape:
    `{"<items_key>": [...], "total": N, "limit": L, "offset": O}`.

    A `limit` or `offset` out of range is a 400 naming it (DRF would quietly clamp it).
    Subclass per resource with `items_key`, or use `EnvelopePagination.of("agents")`.
    """

    items_key = "results"
    default_limit = DEFAULT_PAGE_LIMIT
    max_limit = MAX_PAGE_LIMIT

    @classmethod
    def of(cls, items_key: str) -> type[EnvelopePagination]:
        name = f"{items_key.title().replace('_', '')}Pagination"
        return type(name, (cls,), {"items_key": items_key})

    def _page_query(self, request) -> dict[str, int]:
        query = _PageQuerySerializer(
            data={k: v for k, v in request.query_params.items() if k in ("limit", "offset")}
        )
        query.is_valid(raise_exception=True)
        return query.validated_data

    def get_limit(self, request) -> int:
        return self._page_query(request)["limit"]

    def get_offset(self, request) -> int:
        return self._page_query(request)["offset"]

    def get_paginated_response(self, data) -> Response:
        return Response(
            {self.items_key: data, "total": self.count, "limit": self.limit, "offset": self.offset}
        )

    def get_paginated_response_schema(self, schema: dict) -> dict:
        return {
            "type": "object",
            "required": [self.items_key, "total", "limit", "offset"],
            "properties": {
                self.items_key: schema,
                "total": {"type": "integer", "minimum": 0, "description": "Items in the list."},
                "limit": {"type": "integer", "description": "The page size used."},
                "offset": {"type": "integer", "description": "Index of the page's first item."},
            },
        }

    def get_schema_operation_parameters(self, view) -> list[dict]:
        # The bounds the API enforces, so that clients (and contract tests) know them.
        return [
            {
                "name": self.limit_query_param,
                "required": False,
                "in": "query",
                "description": f"Page size, 1 to {MAX_PAGE_LIMIT}.",
                "schema": {
                    "type": "integer",
                    "minimum": 1,
                    "maximum": MAX_PAGE_LIMIT,
                    "default": DEFAULT_PAGE_LIMIT,
                },
            },
            {
                "name": self.offset_query_param,
                "required": False,
                "in": "query",
                "description": "How many items to skip.",
                "schema": {
                    "type": "integer",
                    "minimum": 0,
                    "maximum": MAX_PAGE_OFFSET,
                    "default": 0,
                },
            },
        ]


class EnvelopeListMixin:
    """For APIView-based list endpoints: set `pagination_class`, answer with
    `self.list_response(queryset, OutputSerializer)`."""

    pagination_class: type[EnvelopePagination]

    def list_response(self, queryset, serializer_class) -> Response:
        paginator = self.pagination_class()
        page = paginator.paginate_queryset(queryset, self.request, view=self)
        return paginator.get_paginated_response(serializer_class(page, many=True).data)


RETRY_AFTER_SECONDS = 5

# Codes of errors that Django answers before (or without) DRF: 404 of an unknown path,
# 405 of a plain view, 413, CSRF, 500.
_DEFAULT_CODES = {
    400: "bad_request",
    401: "not_authenticated",
    403: "permission_denied",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    429: "throttled",
    500: "server_error",
    503: "backend_unavailable",
}


def error_body(
    status_code: int,
    detail: str | None = None,
    code: str | None = None,
    fields: dict[str, list[str]] | None = None,
) -> dict[str, Any]:
    """The body of every error response (see the module docstring)."""
    if detail is None:
        detail = f"{HTTPStatus(status_code).phrase}."
    body: dict[str, Any] = {
        "detail": detail,
        "code": code or _DEFAULT_CODES.get(status_code, "error"),
    }
    for name, messages in (fields or {}).items():
        if name not in body:
            body[name] = messages
    return body


def error_response(status_code: int, detail: str | None = None, code: str | None = None, **headers):
    """An error in the API's shape, for code outside DRF (middleware, plain views)."""
    response = JsonResponse(error_body(status_code, detail, code), status=status_code)
    for name, value in headers.items():
        response[name.replace("_", "-")] = value
    return response


DATABASE_UNAVAILABLE = "The database is busy or unavailable; retry shortly."
DATABASE_READ_ONLY = "The database accepts no changes for now (it is read-only); retry later."


def database_unavailable(exc: Exception) -> str | None:
    """The detail of the 503 a request answers when `exc` says the database cannot
    serve it now, else None: unreachable, no pooled connection free within
    DB_POOL_TIMEOUT_SECONDS, or refusing writes (a standby, or a server its operator or
    host made read-only, as some hosts do when its disk fills; reads still answer)."""
    if isinstance(exc, OperationalError | InterfaceError):
        return DATABASE_UNAVAILABLE
    if isinstance(exc, InternalError) and isinstance(exc.__cause__, ReadOnlySqlTransaction):
        return DATABASE_READ_ONLY
    return None


def database_unavailable_response(exc: Exception, *, where: str) -> JsonResponse | None:
    """503 for a request that met the database unavailable (database_unavailable): load,
    an outage or a read-only server, not a fault of the request, and nothing was
    committed (its transaction, if any, rolled back). None for another error."""
    detail = database_unavailable(exc)
    if detail is None:
        return None
    logger.warning("%s: database unavailable: %r", where, exc)
    return error_response(503, detail, retry_after=str(settings.DB_RETRY_AFTER_SECONDS))


def _messages(value, prefix: str = "") -> list[str]:
    """DRF's nested error details as flat strings: a list item's errors say its index."""
    if isinstance(value, dict):
        found = []
        for key, inner in value.items():
            found += _messages(inner, f"{prefix}item {key}: " if isinstance(key, int) else prefix)
        return found
    if isinstance(value, list):
        return [m for item in value for m in _messages(item, prefix)]
    return [f"{prefix}{value}"]


def _validation_body(exc: exceptions.ValidationError, status_code: int) -> dict[str, Any]:
    general: list[str] = []
    fields: dict[str, list[str]] = {}
    detail = exc.detail
    if isinstance(detail, dict):
        for name, value in detail.items():
            if name in (api_settings.NON_FIELD_ERRORS_KEY, "detail", "code"):
                general += _messages(value)
            else:
                fields[str(name)] = _messages(value)
    else:
        general = _messages(detail)
    summary = " ".join(general)
    if fields:
        named = f"Invalid input: {', '.join(fields)}."
        summary = f"{summary} {named}" if summary else named
    return error_body(status_code, summary or "Invalid input.", "invalid", fields)


def _api_exception_body(exc: APIException, status_code: int) -> dict[str, Any]:
    if isinstance(exc, exceptions.ValidationError):
        return _validation_body(exc, status_code)
    code = exc.default_code
    detail = exc.detail
    if isinstance(detail, dict):  # raised with {"<field>": [...]}: name the field
        fields = {str(name): _messages(value) for name, value in detail.items()}
        summary = " ".join(m for messages in fields.values() for m in messages)
        return error_body(status_code, summary, code, fields)
    if isinstance(detail, list):
        return error_body(status_code, " ".join(_messages(detail)), code)
    return error_body(status_code, str(detail), getattr(detail, "code", None) or code)


def exception_handler(exc, context):
    """DRF's handler in the API's error shape, plus: Redis or the broker being down is a
    503 with Retry-After (views reach them only before writing anything, or after commit
    robustly), and a body over DATA_UPLOAD_MAX_MEMORY_SIZE is a 413. The database
    unavailable (database_unavailable: unreachable, no pooled connection free in time,
    read-only) is a 503 with Retry-After too (DRF rolls the view's transaction back)."""
    retry_after = RETRY_AFTER_SECONDS
    if isinstance(exc, redis.RedisError | kombu.exceptions.OperationalError):
        logger.warning("%s: backend unavailable: %r", context.get("view"), exc)
        exc = BackendUnavailable()
    elif detail := database_unavailable(exc):
        logger.warning("%s: database unavailable: %r", context.get("view"), exc)
        exc = BackendUnavailable(detail)
        retry_after = settings.DB_RETRY_AFTER_SECONDS
    elif isinstance(exc, RequestDataTooBig):
        exc = PayloadTooLarge()
    elif isinstance(exc, Http404):
        exc = exceptions.NotFound(*exc.args)
    elif isinstance(exc, PermissionDenied):
        exc = exceptions.PermissionDenied(*exc.args)
    response = drf_exception_handler(exc, context)
    if response is None:
        return None
    response.data = _api_exception_body(exc, response.status_code)
    # An exception may say more, beside the shape's keys (a quota's limit and reset time).
    for name, value in (getattr(exc, "body_extra", None) or {}).items():
        response.data.setdefault(name, value)
    if response.status_code == status.HTTP_503_SERVICE_UNAVAILABLE:
        response.setdefault("Retry-After", str(retry_after))
    return response


class IntegerInputField(serializers.IntegerField):
    """An integer input as the schema says it: a JSON number (DRF would also take "5",
    true or 5.0)."""

    def to_internal_value(self, data):
        if isinstance(data, bool) or not isinstance(data, int):
            self.fail("invalid")
        return super().to_internal_value(data)
