"""Operators' endpoints: workspace health and stats. Staff only."""

from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import serializers, status
from rest_framework.permissions import IsAdminUser
from rest_framework.response import Response
from rest_framework.views import APIView

from common.api import MAX_PAGE_OFFSET, StrictSerializer
from common.credentials import CredentialScopePermission
from common.schema import error_responses

from .selectors import workspace_health, workspace_stats


class StatsQuerySerializer(StrictSerializer):
    limit = serializers.IntegerField(
        min_value=1, max_value=1000, default=100, help_text="Workspaces in the page (1-1000)."
    )
    offset = serializers.IntegerField(
        min_value=0, max_value=MAX_PAGE_OFFSET, default=0, help_text="How many to skip."
    )


class HealthQuerySerializer(StrictSerializer):
    limit = serializers.IntegerField(
        min_value=1, max_value=500, default=50, help_text="Workspaces detailed (1-500)."
    )
    offset = serializers.IntegerField(
        min_value=0, max_value=MAX_PAGE_OFFSET, default=0, help_text="How many to skip."
    )


class CheckSerializer(serializers.Serializer):
    healthy = serializers.BooleanField()
    error = serializers.CharField(required=False, help_text="Why it is unhealthy.")
    latency_ms = serializers.FloatField(required=False)

    class Meta:
        ref_name = "HealthCheck"


class HealthOutputSerializer(serializers.Serializer):
    detail = serializers.CharField(
        required=False, help_text="503 only: what is unhealthy (as in every error body)."
    )
    code = serializers.CharField(required=False, help_text='503 only: "unhealthy".')
    healthy = serializers.BooleanField()
    total_spaces = serializers.IntegerField()
    healthy_spaces = serializers.IntegerField()
    states = serializers.DictField(
        child=serializers.IntegerField(), help_text="Workspaces per registry state."
    )
    problems = serializers.DictField(
        child=serializers.IntegerField(),
        help_text="Workspaces per problem: initialisation_failed, initialisation_stuck, "
        "teardowns_pending, teardowns_overdue, ...",
    )
    unhealthy_spaces = serializers.ListField(
        child=serializers.CharField(),
        help_text="Keys ({user}_{project}) of the unhealthy ones on this page.",
    )
    offset = serializers.IntegerField()
    limit = serializers.IntegerField()
    details = serializers.DictField(
        child=serializers.JSONField(),
        help_text="This page's workspaces, problems first; per key: healthy, agents, "
        "initialized, state, queue_depth, problems.",
    )
    checks = serializers.DictField(
        child=CheckSerializer(),
        help_text="database, redis, broker, workers, runs, llm (the LLM endpoint: which, "
        "and whether it answers) and registry: each with `healthy`.",
    )

    class Meta:
        ref_name = "Health"


class StatsOutputSerializer(serializers.Serializer):
    active_spaces = serializers.IntegerField(help_text="Initialised workspaces in the registry.")
    total_spaces = serializers.IntegerField(help_text="Workspaces in the registry.")
    states = serializers.DictField(
        child=serializers.IntegerField(), help_text="Workspaces per registry state."
    )
    offset = serializers.IntegerField()
    limit = serializers.IntegerField()
    spaces = serializers.DictField(
        child=serializers.JSONField(),
        help_text="Per workspace key ({user}_{project}): state, agents, queue depth, times.",
    )
    process = serializers.DictField(
        child=serializers.JSONField(), help_text="This web process's in-memory view."
    )

    class Meta:
        ref_name = "Stats"


def _unhealthy_detail(report: dict) -> str:
    failing = [name for name, check in report["checks"].items() if not check.get("healthy")]
    failing += report["unhealthy_spaces"]
    return "Unhealthy: " + ", ".join(failing) + "."


@extend_schema(tags=["Operators"])
class WorkspaceHealthApi(APIView):
    permission_classes = [IsAdminUser, CredentialScopePermission]

    @extend_schema(
        operation_id="operators_health",
        summary="Health of the stack and a page of workspaces",
        description="Database, Redis, the broker, live workers (from their heartbeats), "
        "agent runs and the LLM endpoint; the registry's workspaces counted by state and "
        "by problem; a page of workspaces in detail, those with problems first. 503 with "
        "the same report (plus `detail` and `code`, as every error) when anything is "
        "unhealthy.",
        parameters=[HealthQuerySerializer],
        responses={
            200: HealthOutputSerializer,
            503: OpenApiResponse(HealthOutputSerializer, description="Something is unhealthy."),
        },
    )
    def get(self, request):
        # A plain dict: DRF reads an empty `?limit=` in a QueryDict as "not given".
        query = HealthQuerySerializer(data=request.query_params.dict())
        query.is_valid(raise_exception=True)
        report = workspace_health(**query.validated_data)
        if report["healthy"]:
            return Response(report)
        body = {"detail": _unhealthy_detail(report), "code": "unhealthy", **report}
        response = Response(body, status=status.HTTP_503_SERVICE_UNAVAILABLE)
        # A report, not a failure of this server: the access log's line is enough, without
        # Django's "Service Unavailable" error line on every probe.
        response._has_been_logged = True
        return response


@extend_schema(tags=["Operators"])
class WorkspaceStatsApi(APIView):
    permission_classes = [IsAdminUser, CredentialScopePermission]

    @extend_schema(
        operation_id="operators_stats",
        summary="Statistics of the workspaces, a page at a time",
        description="A page of the registry's workspaces (all processes), sorted by user "
        "and project, their counts by state, this process's in-memory view, and the "
        "health checks' reports (e.g. `runs`) as keys of their own.",
        parameters=[StatsQuerySerializer],
        responses={200: StatsOutputSerializer, **error_responses(503)},
    )
    def get(self, request):
        # A plain dict: DRF reads an empty `?limit=` in a QueryDict as "not given".
        query = StatsQuerySerializer(data=request.query_params.dict())
        query.is_valid(raise_exception=True)
        return Response(workspace_stats(**query.validated_data))
