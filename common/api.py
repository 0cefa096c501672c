"""Pieces every API of the project shares: strict input serializers and the list envelope."""

from __future__ import annotations

import logging
from typing import Any

import kombu.exceptions
import redis
from rest_framework import serializers, status
from rest_framework.exceptions import APIException
from rest_framework.pagination import LimitOffsetPagination
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

logger = logging.getLogger(__name__)


class StrictSerializer(serializers.Serializer):
    """An input serializer that rejects fields it does not know, instead of ignoring them."""

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        unknown = set(getattr(self, "initial_data", {}) or {}) - set(self.fields)
        if unknown:
            raise serializers.ValidationError(
                {name: ["Unknown field."] for name in sorted(unknown)}
            )
        return attrs


class _PageQuerySerializer(serializers.Serializer):
    limit = serializers.IntegerField(min_value=1, max_value=200, default=50)
    offset = serializers.IntegerField(min_value=0, max_value=2**31 - 1, default=0)


class EnvelopePagination(LimitOffsetPagination):
    """DRF's limit/offset pagination in this API's list shape:
    `{"<items_key>": [...], "total": N, "limit": L, "offset": O}`.

    A `limit` or `offset` out of range is a 400 naming it (DRF would quietly clamp it).
    Subclass per resource with `items_key`, or use `EnvelopePagination.of("agents")`.
    """

    items_key = "results"
    default_limit = 50
    max_limit = 200

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
                "total": {"type": "integer", "description": "Items in the whole list."},
                "limit": {"type": "integer", "description": "Page size used."},
                "offset": {"type": "integer", "description": "Index of the first item."},
            },
        }


class EnvelopeListMixin:
    """For APIView-based list endpoints: set `pagination_class`, answer with
    `self.list_response(queryset, OutputSerializer)`."""

    pagination_class: type[EnvelopePagination]

    def list_response(self, queryset, serializer_class) -> Response:
        paginator = self.pagination_class()
        page = paginator.paginate_queryset(queryset, self.request, view=self)
        return paginator.get_paginated_response(serializer_class(page, many=True).data)


class BackendUnavailable(APIException):
    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    default_detail = "A service this request needs is unavailable; retry shortly."
    default_code = "backend_unavailable"


RETRY_AFTER_SECONDS = 5


def exception_handler(exc, context):
    """DRF's handler, plus: Redis or the broker being down is a 503 with Retry-After
    (views reach them only before writing anything, or after commit robustly)."""
    if isinstance(exc, redis.RedisError | kombu.exceptions.OperationalError):
        logger.warning("%s: backend unavailable: %r", context.get("view"), exc)
        exc = BackendUnavailable()
    response = drf_exception_handler(exc, context)
    if response is not None and response.status_code == status.HTTP_503_SERVICE_UNAVAILABLE:
        response.setdefault("Retry-After", str(RETRY_AFTER_SECONDS))
    return response
