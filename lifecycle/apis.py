"""A user's own account (self-service deletion) and a project's retention periods."""

import threading

from django.conf import settings
from django.http import FileResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema
from rest_framework import exceptions, serializers, status
from rest_framework.parsers import MultiPartParser
from rest_framework.response import Response
from rest_framework.views import APIView

from common.api import (
    BackendUnavailable,
    Conflict,
    EnvelopeListMixin,
    EnvelopePagination,
    FieldNotFound,
    IntegerInputField,
    PayloadTooLarge,
    StrictSerializer,
    TextField,
    UUIDField,
)
from common.parsers import JSONParser
from common.schema import error_responses
from common.selectors import get_or_404
from governance.audit import audit_pseudonym
from projects.mixins import ProjectScopedApi

from .accounts import user_delete
from .archive_schema import ArchiveInvalid
from .exports import (
    archive_path,
    archive_read,
    export_start,
    import_start,
    import_webhook_secrets_take,
)
from .models import ArchiveJob, RetentionPolicy
from .retention import retention_effective, retention_kinds, retention_policy_set

MAX_RETENTION_DAYS = 100 * 366

_KIND_HELP = {
    "sessions_days": "Chat sessions with no message for this long go, with their "
    "messages and runs.",
    "run_steps_days": "Runs that ended this long ago keep their status and timings, not "
    "their steps (tool calls and results).",
    "events_days": "A session's event history (what `…/events/?cursor=0` replays) older "
    "than this goes.",
    "usage_days": "Raw usage rows older than this are rolled up per day (usage and "
    "quotas count the rollups alike).",
    "session_context_days": "What agents remember of a session (its exchanges in their "
    "context) goes once the session has had no message for this long, or is gone.",
    "webhook_deliveries_days": "Webhook deliveries (with their attempts) made this long "
    "ago go; pending ones stay.",
    "schedule_fires_days": "Schedules' firings (`…/fires/`) made this long ago go; each "
    "schedule's latest stays.",
}


class AccountDeleteInputSerializer(StrictSerializer):
    confirm = TextField(
        max_length=150, help_text="Your username: confirms the deletion of everything."
    )

    class Meta:
        ref_name = "AccountDeleteInput"


@extend_schema(tags=["Account"])
class AccountApi(APIView):
    # The account's own credentials (token or session) only: a project API key is a 403.
    credential_scopes = {"DELETE": None}

    @extend_schema(
        operation_id="account_destroy",
        summary="Delete your account and everything of it",
        description="Deletes every project of yours exactly as deleting each project does "
        "(agents, sessions, messages, context, keys, secrets; workspaces torn down), your "
        "API token and your usage records (kept only as anonymised daily totals); the "
        "audit trail stays, anonymised. Only where the deployment allows it "
        "(`ACCOUNT_SELF_DELETE`); otherwise 403. Needs your own credentials.",
        request=AccountDeleteInputSerializer,
        responses={204: None, **error_responses(403)},
    )
    def delete(self, request):
        if not settings.ACCOUNT_SELF_DELETE:
            raise exceptions.PermissionDenied(
                "This deployment does not let users delete their accounts; ask an operator."
            )
        data = AccountDeleteInputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        if data.validated_data["confirm"] != request.user.get_username():
            raise exceptions.ValidationError({"confirm": ["Must be your username."]})
        # The audit record of this request names the user as their other records will.
        request._request.audit_pseudonym = audit_pseudonym(request.user.pk)
        user_delete(user=request.user)
        return Response(status=status.HTTP_204_NO_CONTENT)


def _days_field(name: str, *, output: bool = False) -> serializers.Field:
    if output:
        return serializers.IntegerField(allow_null=True, help_text=_KIND_HELP.get(name, ""))
    return IntegerInputField(
        min_value=0,
        max_value=MAX_RETENTION_DAYS,
        allow_null=True,
        required=False,
        help_text=f"{_KIND_HELP.get(name, '')} Days; 0 keeps forever; null follows the deployment.",
    )


class RetentionPeriodsSerializer(serializers.Serializer):
    sessions_days = _days_field("sessions_days", output=True)
    run_steps_days = _days_field("run_steps_days", output=True)
    events_days = _days_field("events_days", output=True)
    usage_days = _days_field("usage_days", output=True)
    session_context_days = _days_field("session_context_days", output=True)
    webhook_deliveries_days = _days_field("webhook_deliveries_days", output=True)
    schedule_fires_days = _days_field("schedule_fires_days", output=True)

    class Meta:
        ref_name = "RetentionPeriods"


class RetentionOutputSerializer(serializers.Serializer):
    own = RetentionPeriodsSerializer(help_text="The project's own periods (null: none).")
    effective = RetentionPeriodsSerializer(
        help_text="What applies: the project's own, else the deployment's (0: kept forever)."
    )

    class Meta:
        ref_name = "Retention"


class RetentionInputSerializer(StrictSerializer):
    sessions_days = _days_field("sessions_days")
    run_steps_days = _days_field("run_steps_days")
    events_days = _days_field("events_days")
    usage_days = _days_field("usage_days")
    session_context_days = _days_field("session_context_days")
    webhook_deliveries_days = _days_field("webhook_deliveries_days")
    schedule_fires_days = _days_field("schedule_fires_days")

    class Meta:
        ref_name = "RetentionInput"


def _body(policy: RetentionPolicy | None) -> dict:
    kinds = [k for k in retention_kinds() if k in RetentionPeriodsSerializer().fields]
    return {
        "own": {k: getattr(policy, k, None) if policy else None for k in kinds},
        "effective": retention_effective(policy=policy),
    }


@extend_schema(tags=["Projects"])
class RetentionApi(ProjectScopedApi):
    # Shortening retention deletes data: the owner's own credentials, as for a delete.
    credential_scopes = {"PUT": None}

    @extend_schema(
        operation_id="retention_retrieve",
        summary="How long the project's data is kept",
        responses={200: RetentionOutputSerializer},
    )
    def get(self, request, project_id):
        policy = RetentionPolicy.objects.filter(project=self.project).first()
        return Response(RetentionOutputSerializer(_body(policy)).data)

    @extend_schema(
        operation_id="retention_update",
        summary="Set the project's own retention periods",
        description="Sets the periods given (null: the deployment's again). The hourly "
        "sweep removes what they let go, in small chunks. Needs the owner's own "
        "credentials: a project API key is refused (403).",
        request=RetentionInputSerializer,
        responses={200: RetentionOutputSerializer},
    )
    def put(self, request, project_id):
        data = RetentionInputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        policy = retention_policy_set(project=self.project, data=data.validated_data)
        return Response(RetentionOutputSerializer(_body(policy)).data)


# --- Export and import ----------------------------------------------------------------------


class ArchiveJobOutputSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    kind = serializers.ChoiceField(choices=ArchiveJob.Kind.choices)
    status = serializers.ChoiceField(choices=ArchiveJob.Status.choices)
    error = serializers.CharField()
    project_id = serializers.UUIDField(
        allow_null=True, help_text="Export: the project exported. Import: the project made."
    )
    source_id = serializers.UUIDField(allow_null=True, help_text="Import: the export it read.")
    counts = serializers.DictField(
        help_text="Records per section (agents, tools, sessions, messages, runs, usage, "
        "memory_blocks, webhooks, schedules, context chunks); an import adds "
        "`secrets_to_set` (names: values never travel), `switched_off` (schedules and "
        "webhooks that were on) and `context_jobs` (…/agents/{id}/context/jobs/{job_id}/ "
        "of the re-embedding)."
    )
    webhook_secrets = serializers.DictField(
        child=serializers.CharField(),
        default=dict,
        help_text="Import: the signing secrets of the webhooks it made (by endpoint id), "
        "on the first read after it is done only; later reads show {}.",
    )
    size_bytes = serializers.IntegerField()
    seconds = serializers.FloatField(allow_null=True)
    created_at = serializers.DateTimeField()
    finished_at = serializers.DateTimeField(allow_null=True)

    class Meta:
        ref_name = "ArchiveJob"


class EmptyInputSerializer(StrictSerializer):
    class Meta:
        ref_name = "ExportInput"


class ImportInputSerializer(StrictSerializer):
    export_id = UUIDField(
        required=False, help_text="A finished export of one of your projects (JSON)."
    )
    archive = serializers.FileField(
        required=False,
        allow_empty_file=False,
        help_text="Or an archive (multipart/form-data), e.g. one downloaded from "
        "…/exports/{id}/archive/ on any deployment: at most IMPORT_MAX_BYTES (else 413), "
        "checked whole before anything is written (a 400 says what is wrong).",
    )

    class Meta:
        ref_name = "ImportInput"

    def validate(self, attrs):
        attrs = super().validate(attrs)
        if ("export_id" in attrs) == ("archive" in attrs):
            raise serializers.ValidationError(
                {"export_id": ["Give an export_id or an archive: exactly one."]}
            )
        upload = attrs.get("archive")
        if upload is not None and upload.size > settings.IMPORT_MAX_BYTES:
            raise PayloadTooLarge(f"The archive is larger than {settings.IMPORT_MAX_BYTES} bytes.")
        return attrs


def _export_get(project, job_id) -> ArchiveJob:
    return get_or_404(ArchiveJob.objects.filter(kind=ArchiveJob.Kind.EXPORT, project=project),
                      id=job_id)  # fmt: skip


@extend_schema(tags=["Projects"])
class ExportListCreateApi(EnvelopeListMixin, ProjectScopedApi):
    pagination_class = EnvelopePagination.of("exports")
    # An archive holds everything: the owner's own credentials start one.
    credential_scopes = {"POST": None}

    @extend_schema(operation_id="exports_list", summary="List the project's exports",
                   responses={200: ArchiveJobOutputSerializer(many=True)})  # fmt: skip
    def get(self, request, project_id):
        jobs = ArchiveJob.objects.filter(kind=ArchiveJob.Kind.EXPORT, project=self.project)
        return self.list_response(jobs, ArchiveJobOutputSerializer)

    @extend_schema(
        operation_id="exports_create",
        summary="Export the project",
        description="Starts a job that writes one archive (a zip of JSON lines: agents with "
        "their versions, tools, secret names (never values), sessions, messages, runs with "
        "their steps, usage as daily totals, and each agent's context documents). Follow it "
        "at …/exports/{id}/, download it at …/exports/{id}/archive/.",
        request=EmptyInputSerializer,
        responses={202: ArchiveJobOutputSerializer},
    )
    def post(self, request, project_id):
        EmptyInputSerializer(data=request.data).is_valid(raise_exception=True)
        job = export_start(project=self.project, owner=request.user)
        return Response(ArchiveJobOutputSerializer(job).data, status=status.HTTP_202_ACCEPTED)


@extend_schema(tags=["Projects"])
class ExportDetailApi(ProjectScopedApi):
    @extend_schema(operation_id="exports_retrieve", summary="An export's status",
                   responses={200: ArchiveJobOutputSerializer})  # fmt: skip
    def get(self, request, project_id, job_id):
        return Response(ArchiveJobOutputSerializer(_export_get(self.project, job_id)).data)


@extend_schema(tags=["Projects"])
class ExportArchiveApi(ProjectScopedApi):
    @extend_schema(
        operation_id="exports_archive",
        summary="Download an export's archive",
        description="The zip once the export is done; 404 before.",
        responses={(200, "application/octet-stream"): OpenApiTypes.BINARY},
    )
    def get(self, request, project_id, job_id):
        job = _export_get(self.project, job_id)
        path = archive_path(job)
        if job.status != ArchiveJob.Status.DONE or not path.exists():
            raise exceptions.NotFound("The archive is not ready.")
        return FileResponse(path.open("rb"), as_attachment=True,
                            filename=f"project-{job.project_id}.zip",
                            content_type="application/octet-stream")  # fmt: skip


# Checking an upload holds its records in memory: at most IMPORT_CHECKS_AT_ONCE in this
# process, whoever sends them.
_archive_checks = threading.BoundedSemaphore(max(settings.IMPORT_CHECKS_AT_ONCE, 1))


@extend_schema(tags=["Projects"])
class ImportApi(APIView):
    parser_classes = [JSONParser, MultiPartParser]
    throttle_scopes = {"POST": "imports"}

    @staticmethod
    def max_body_bytes() -> int:
        """The archive a request may carry (common.asgi refuses a larger body unread)."""
        return settings.IMPORT_MAX_BYTES

    @extend_schema(
        operation_id="projects_import",
        summary="Recreate an exported project as a new project of yours",
        description="Reads a finished export of one of your projects (`export_id`, JSON) or "
        "an uploaded archive (`archive`, multipart) and makes a new project with everything "
        "in it under new ids; the context is embedded again with this deployment's model "
        "(its jobs are listed in `counts.context_jobs`). An upload is checked whole first "
        "(size, zip structure, manifest and version, every record's schema, references "
        "inside the archive only): a bad one is a 400 and nothing is written; at most "
        "THROTTLE_IMPORTS_USER per user (429). Secrets are "
        "not in archives: `counts.secrets_to_set` names those to set. Webhooks come back "
        "with new secrets (shown once: `webhook_secrets` on the first read after the import "
        "is done) and, like schedules, switched off (`counts.switched_off`): a copy must "
        "not fire twice what the original fires. Follow it at /my/projects/imports/{id}/.",
        request={
            "application/json": ImportInputSerializer,
            "multipart/form-data": ImportInputSerializer,
        },
        responses={
            202: ArchiveJobOutputSerializer,
            **error_responses(
                404,
                409,
                413,
                503,
                _404="No export of yours has this `export_id` (`export_id` says so).",
                _409="The export has not finished (`export_id` says so).",
                _503="This server is checking another archive (IMPORT_CHECKS_AT_ONCE): "
                "retry after `Retry-After` seconds.",
            ),
        },
    )
    def post(self, request):
        data = ImportInputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        upload = data.validated_data.get("archive")
        if upload is not None:
            if not _archive_checks.acquire(blocking=False):
                raise BackendUnavailable("Another archive is being checked; retry shortly.")
            try:
                archive_read(upload)
            except ArchiveInvalid as exc:
                raise exceptions.ValidationError({"archive": [str(exc)]}) from None
            finally:
                _archive_checks.release()
            job = import_start(owner=request.user, upload=upload)
            return Response(ArchiveJobOutputSerializer(job).data, status=status.HTTP_202_ACCEPTED)
        source = ArchiveJob.objects.filter(
            kind=ArchiveJob.Kind.EXPORT, project__owner=request.user,
            id=data.validated_data["export_id"],
        ).first()  # fmt: skip
        if source is None:
            raise FieldNotFound({"export_id": ["No such export of yours."]})
        if source.status != ArchiveJob.Status.DONE:
            raise Conflict({"export_id": ["The export has not finished."]})
        job = import_start(owner=request.user, source=source)
        return Response(ArchiveJobOutputSerializer(job).data, status=status.HTTP_202_ACCEPTED)


@extend_schema(tags=["Projects"])
class ImportDetailApi(APIView):
    @extend_schema(operation_id="imports_retrieve", summary="An import's status",
                   responses={200: ArchiveJobOutputSerializer})  # fmt: skip
    def get(self, request, job_id):
        jobs = ArchiveJob.objects.filter(kind=ArchiveJob.Kind.IMPORT, owner=request.user)
        job = get_or_404(jobs, id=job_id)
        job.webhook_secrets = import_webhook_secrets_take(job=job)
        return Response(ArchiveJobOutputSerializer(job).data)
