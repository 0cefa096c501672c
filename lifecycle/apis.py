"""A user's own account (self-service deletion) and a project's retention periods."""

from django.conf import settings
from drf_spectacular.utils import extend_schema
from rest_framework import exceptions, serializers, status
from rest_framework.response import Response
from rest_framework.views import APIView

from common.api import IntegerInputField, StrictSerializer, TextField
from common.schema import error_responses
from governance.audit import audit_pseudonym
from projects.mixins import ProjectScopedApi

from .accounts import user_delete
from .models import RetentionPolicy
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
