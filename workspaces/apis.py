"""Operators' endpoints: workspace health and stats. Staff only."""

from django.http import Http404
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import serializers, status
from rest_framework.permissions import IsAdminUser
from rest_framework.response import Response
from rest_framework.views import APIView

from common.api import MAX_PAGE_OFFSET, StrictSerializer
from common.credentials import CredentialScopePermission
from common.schema import error_responses
from projects.models import MAX_FLOW_IN_FLIGHT, MAX_FLOW_WEIGHT, Project
from projects.services import project_flow_update

from .selectors import project_flow, project_health, workspace_health, workspace_stats


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
    warning = serializers.CharField(
        required=False,
        help_text="Healthy, but set up to fail some day (redis, broker: a maxmemory-policy "
        "that evicts keys, or 90% of maxmemory used); the check is then in `degraded`.",
    )

    class Meta:
        ref_name = "HealthCheck"


class HealthOutputSerializer(serializers.Serializer):
    detail = serializers.CharField(
        required=False, help_text="503 only: what is unhealthy (as in every error body)."
    )
    code = serializers.CharField(required=False, help_text='503 only: "unhealthy".')
    healthy = serializers.BooleanField(
        help_text="False (and 503) only when something every tenant needs fails: the "
        "database, Redis, the broker, no live worker."
    )
    degraded = serializers.ListField(
        child=serializers.CharField(),
        help_text="Checks and problems that fail for some projects only (runs, llm, "
        "initialisation_failed, ...) and checks with a `warning`: reported, never a 503.",
    )
    unhealthy_projects = serializers.ListField(
        child=serializers.DictField(),
        help_text="The projects with problems, named: project_id, user_id, project_name, "
        "problems (the runs check names the most affected ones; workspaces, this page's).",
    )
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


class ProjectHealthOutputSerializer(serializers.Serializer):
    detail = serializers.CharField(required=False, help_text="503 only: what is unhealthy.")
    code = serializers.CharField(required=False, help_text='503 only: "unhealthy".')
    healthy = serializers.BooleanField()
    project_id = serializers.UUIDField()
    project_name = serializers.CharField()
    user_id = serializers.IntegerField()
    problems = serializers.ListField(child=serializers.CharField(), help_text="Named by check.")
    workspace = serializers.DictField(
        allow_null=True, help_text="The registry's view: state, initialized, agents, queue_depth."
    )
    checks = serializers.DictField(
        child=CheckSerializer(), help_text="database, redis, workers, workspace, runs."
    )

    class Meta:
        ref_name = "ProjectHealth"


def _unhealthy_detail(report: dict) -> str:
    failing = [name for name, check in report["checks"].items() if not check.get("healthy")]
    return "Unhealthy: " + ", ".join(failing) + "."


def _unhealthy_response(body: dict) -> Response:
    response = Response(body, status=status.HTTP_503_SERVICE_UNAVAILABLE)
    # A report, not a failure of this server: the access log's line is enough, without
    # Django's "Service Unavailable" error line on every probe.
    response._has_been_logged = True
    return response


@extend_schema(tags=["Operators"])
class WorkspaceHealthApi(APIView):
    permission_classes = [IsAdminUser, CredentialScopePermission]

    @extend_schema(
        operation_id="operators_health",
        summary="Health of the stack and a page of workspaces",
        description="Database, Redis and the broker (a Redis must take a write: a full "
        "or read-only one answers PING but refuses writes; RabbitMQ, a connection of its "
        "own), live workers (from their heartbeats), agent runs and the LLM endpoint; "
        "the registry's workspaces counted by state and by problem; a page of workspaces "
        "in detail, those with problems first. 503 with the same report (plus `detail` "
        "and `code`, as every error) only when something every tenant needs fails "
        "(database, Redis, broker, no live worker); one project's problems are "
        "`degraded` and named in `unhealthy_projects`.",
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
        failing = [n for n, c in report["checks"].items() if not c["healthy"]]
        failing = [n for n in failing if n not in report["degraded"]]
        body = {"detail": "Unhealthy: " + ", ".join(failing) + ".", "code": "unhealthy"}
        return _unhealthy_response({**body, **report})


@extend_schema(tags=["Operators"])
class ProjectHealthApi(APIView):
    permission_classes = [IsAdminUser, CredentialScopePermission]

    @extend_schema(
        operation_id="operators_project_health",
        summary="Health of one project",
        description="What the project stands on (database, Redis, live workers), its "
        "workspace as the registry sees it and its runs (stuck, failed recently). 503 "
        "with the same report when anything this project needs is unhealthy; 404 for a "
        "project that does not exist.",
        responses={
            200: ProjectHealthOutputSerializer,
            503: OpenApiResponse(ProjectHealthOutputSerializer, description="Unhealthy."),
            **error_responses(404),
        },
    )
    def get(self, request, project_id):
        report = project_health(project_id=project_id)
        if report["healthy"]:
            return Response(report)
        return _unhealthy_response(
            {"detail": _unhealthy_detail(report), "code": "unhealthy", **report}
        )


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


class ProjectFlowInputSerializer(StrictSerializer):
    weight = serializers.IntegerField(
        min_value=1,
        max_value=MAX_FLOW_WEIGHT,
        allow_null=True,
        required=False,
        help_text="Share under contention (null: the deployment's default).",
    )
    max_in_flight = serializers.IntegerField(
        min_value=0,
        max_value=MAX_FLOW_IN_FLIGHT,
        required=False,
        help_text="Most tasks in flight at once across all workers (0: no cap).",
    )

    class Meta:
        ref_name = "ProjectFlowInput"


class FlowBusSerializer(serializers.Serializer):
    weight = serializers.IntegerField()
    max_in_flight = serializers.IntegerField()
    in_flight = serializers.IntegerField(help_text="Capped slots held now.")
    waiting = serializers.IntegerField(help_text="Tasks in the queue, both lanes.")
    waiting_bulk = serializers.IntegerField()
    parked = serializers.BooleanField(help_text="At its cap: waiting for a slot.")
    served = serializers.IntegerField(help_text="Tasks taken by the shared workers.")
    served_bulk = serializers.IntegerField()
    cap_waits = serializers.IntegerField(help_text="Takes refused at the cap.")

    class Meta:
        ref_name = "FlowBus"


class ProjectFlowOutputSerializer(serializers.Serializer):
    project_id = serializers.UUIDField()
    project_name = serializers.CharField()
    weight = serializers.IntegerField(allow_null=True, help_text="Null: the default.")
    effective_weight = serializers.IntegerField()
    max_in_flight = serializers.IntegerField()
    applied = serializers.BooleanField(help_text="Whether the bus applies these rules now.")
    bus = FlowBusSerializer(help_text="The rules as the bus applies them, and live figures.")

    class Meta:
        ref_name = "ProjectFlow"


@extend_schema(tags=["Operators"])
class ProjectFlowApi(APIView):
    permission_classes = [IsAdminUser, CredentialScopePermission]

    @extend_schema(
        operation_id="operators_project_flow",
        summary="A project's flow rules and live figures",
        description="Its weight and cap as stored and as the shared workers apply them, "
        "with what it has in flight, waiting, served and refused at its cap. 404 for a "
        "project that does not exist.",
        responses={200: ProjectFlowOutputSerializer, **error_responses(404, 503)},
    )
    def get(self, request, project_id):
        return Response(project_flow(project_id=project_id))

    @extend_schema(
        operation_id="operators_project_flow_update",
        summary="Set a project's weight or cap",
        description="Changes only the fields given; the shared workers apply them from "
        "their next take. The owner sees them (read-only) on the project.",
        request=ProjectFlowInputSerializer,
        responses={200: ProjectFlowOutputSerializer, **error_responses(400, 404, 503)},
    )
    def patch(self, request, project_id):
        project = Project.objects.filter(id=project_id).first()
        if project is None:
            raise Http404("No such project.")
        data = ProjectFlowInputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        fields = {"weight": "flow_weight", "max_in_flight": "flow_max_in_flight"}
        changes = {fields[k]: v for k, v in data.validated_data.items()}
        project_flow_update(project=project, data=changes)
        return Response(project_flow(project_id=project_id))
