"""Operators' endpoints: workspace health and stats. Staff only."""

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers, status
from rest_framework.permissions import IsAdminUser
from rest_framework.response import Response
from rest_framework.views import APIView

from common.api import StrictSerializer

from .selectors import workspace_health, workspace_stats


class StatsQuerySerializer(StrictSerializer):
    limit = serializers.IntegerField(min_value=1, max_value=10000, default=1000)
    offset = serializers.IntegerField(min_value=0, default=0)


class WorkspaceHealthApi(APIView):
    permission_classes = [IsAdminUser]

    @extend_schema(
        responses={200: OpenApiTypes.OBJECT, 503: OpenApiTypes.OBJECT},
        description="Database, Redis, broker, live workers and every workspace of the "
        "registry. 503 (same body) when anything is unhealthy.",
    )
    def get(self, request):
        report = workspace_health()
        code = status.HTTP_200_OK if report["healthy"] else status.HTTP_503_SERVICE_UNAVAILABLE
        return Response(report, status=code)


class WorkspaceStatsApi(APIView):
    permission_classes = [IsAdminUser]

    @extend_schema(
        parameters=[
            OpenApiParameter("limit", int, description="at most this many workspaces"),
            OpenApiParameter("offset", int),
        ],
        responses=OpenApiTypes.OBJECT,
        description="Every workspace of the registry (all processes), sorted by user and "
        "project, and this process's in-memory view.",
    )
    def get(self, request):
        query = StatsQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        return Response(workspace_stats(**query.validated_data))
