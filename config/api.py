"""Small pieces every API of the project shares."""

from __future__ import annotations

from typing import Any

from django.db.models import QuerySet
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response

MAX_TEXT_BYTES = 32 * 1024


class StrictSerializer(serializers.Serializer):
    """An input serializer that rejects fields it does not know, instead of ignoring them."""

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        unknown = set(getattr(self, "initial_data", {}) or {}) - set(self.fields)
        if unknown:
            raise serializers.ValidationError(
                {name: ["Unknown field."] for name in sorted(unknown)}
            )
        return attrs


def validate_text_size(value: str) -> str:
    if len(value.encode("utf-8")) > MAX_TEXT_BYTES:
        raise serializers.ValidationError(f"Must be at most {MAX_TEXT_BYTES} bytes (UTF-8).")
    return value


class LimitOffsetSerializer(StrictSerializer):
    limit = serializers.IntegerField(min_value=1, max_value=200, default=50)
    offset = serializers.IntegerField(min_value=0, default=0)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        return attrs  # other query parameters (filters) are the view's business


def list_response(
    *, request: Request, queryset: QuerySet, serializer_class: type, key: str
) -> Response:
    """A page of `queryset` in the seed's shape: {key: [...], "total": N, "limit", "offset"}."""
    page = LimitOffsetSerializer(data=request.query_params)
    page.is_valid(raise_exception=True)
    limit, offset = page.validated_data["limit"], page.validated_data["offset"]
    items = queryset[offset : offset + limit]
    return Response(
        {
            key: serializer_class(items, many=True).data,
            "total": queryset.count(),
            "limit": limit,
            "offset": offset,
        }
    )
