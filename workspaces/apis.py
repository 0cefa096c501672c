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
    limit = serializers.IntegerField(min_value=1, max_value=1000, default=100)
    offset = serializers.IntegerField(min_value=0, max_value=2**31 - 1, default=0)


class HealthQuerySerializer(StrictSerializer):
    limit = serializers.IntegerField(min_value=1, max_value=500, default=50)
    offset = serializers.IntegerField(min_value=0, max_value=2**31 - 1, default=0)


class WorkspaceHealthApi(APIView):
    permission_classes = [IsAdminUser]

    @extend_schema(
        parameters=[
            OpenApiParameter("limit", int, description="workspaces detailed (1-500, 50)"),
            OpenApiParameter("offset", int),
        ],
        responses={200: OpenApiTypes.OBJECT, 503: OpenApiTypes.OBJECT},
        description="Database, Redis, broker and live workers (from their heartbeats); "
        "the registry's workspaces counted by state and by problem; a page of workspaces "
        "in detail, those with problems first. 503 (same body) when anything is "
        "unhealthy.",
    )
    def get(self, request):
        query = HealthQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        report = workspace_health(**query.validated_data)
        code = status.HTTP_200_OK if report["healthy"] else status.HTTP_503_SERVICE_UNAVAILABLE
        return Response(report, status=code)


class WorkspaceStatsApi(APIView):
    permission_classes = [IsAdminUser]

    @extend_schema(
        parameters=[
            OpenApiParameter("limit", int, description="workspaces in the page (1-1000, 100)"),
            OpenApiParameter("offset", int),
        ],
        responses=OpenApiTypes.OBJECT,
        description="A page of the registry's workspaces (all processes), sorted by user "
        "and project, their counts by state, and this process's in-memory view.",
    )
    def get(self, request):
        query = StatsQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        return Response(workspace_stats(**query.validated_data))
