"""A project's governance: its API keys (usage and quotas: below)."""

from __future__ import annotations

from datetime import date, timedelta

from django.core.validators import RegexValidator
from django.http import HttpResponse
from django.utils import timezone
from drf_spectacular.utils import OpenApiResponse, extend_schema
from prometheus_client import CONTENT_TYPE_LATEST
from rest_framework import serializers, status
from rest_framework.permissions import IsAdminUser
from rest_framework.response import Response
from rest_framework.views import APIView

from common.api import EnvelopeListMixin, EnvelopePagination, StrictSerializer, TextField
from common.credentials import SCOPES, CredentialScopePermission
from common.schema import ErrorSerializer
from projects.mixins import ProjectScopedApi

from .metrics import metrics_render
from .models import AuditEvent, Quota
from .quotas import quota_status
from .selectors import (
    USAGE_GROUPS,
    api_key_get,
    api_key_list,
    audit_list,
    provider_settings_get,
    usage_summary,
)
from .services import KEEP, api_key_create, api_key_revoke, provider_settings_update

# Keys cannot list, mint or revoke keys: a read-only key must not make itself a writer.
USER_CREDENTIALS_ONLY = {"GET": None, "POST": None, "DELETE": None}


class ApiKeyOutputSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    name = serializers.CharField()
    prefix = serializers.CharField(help_text="The key's first characters, to recognise it.")
    scopes = serializers.ListField(child=serializers.ChoiceField(choices=SCOPES))
    created_at = serializers.DateTimeField()
    last_used_at = serializers.DateTimeField(
        allow_null=True, help_text="Within a minute; null if never used."
    )
    revoked_at = serializers.DateTimeField(allow_null=True)

    class Meta:
        ref_name = "ApiKey"


class ApiKeyCreatedSerializer(ApiKeyOutputSerializer):
    key = serializers.CharField(
        help_text="The key, shown this once: send it as `Authorization: Bearer <key>`."
    )

    class Meta:
        ref_name = "ApiKeyCreated"


class ApiKeyInputSerializer(StrictSerializer):
    name = TextField(max_length=200)
    scopes = serializers.ListField(
        child=serializers.ChoiceField(choices=SCOPES),
        min_length=1,
        max_length=len(SCOPES),
        help_text="`read`: every GET of the project; `write`: changes to the project, its "
        "agents, sessions and context; `chat`: send messages and cancel answers.",
    )

    class Meta:
        ref_name = "ApiKeyInput"


@extend_schema(tags=["Governance"])
class ApiKeyListCreateApi(EnvelopeListMixin, ProjectScopedApi):
    pagination_class = EnvelopePagination.of("keys")
    credential_scopes = USER_CREDENTIALS_ONLY

    @extend_schema(
        operation_id="api_keys_list",
        summary="List a project's API keys",
        description="Newest first, revoked ones included. The keys themselves are not "
        "stored and never shown again.",
        responses={200: ApiKeyOutputSerializer(many=True)},
    )
    def get(self, request, project_id):
        return self.list_response(api_key_list(project=self.project), ApiKeyOutputSerializer)

    @extend_schema(
        operation_id="api_keys_create",
        summary="Create a project API key",
        description="A key reaches this project only (every other project is a 404, "
        "`/my/projects/` lists this one), within its scopes. The answer holds the key: "
        "it is shown this once.",
        request=ApiKeyInputSerializer,
        responses={201: ApiKeyCreatedSerializer},
    )
    def post(self, request, project_id):
        data = ApiKeyInputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        key, raw = api_key_create(
            project=self.project, created_by=request.user, **data.validated_data
        )
        body = {**ApiKeyOutputSerializer(key).data, "key": raw}
        return Response(body, status=status.HTTP_201_CREATED)


@extend_schema(tags=["Governance"])
class ApiKeyDetailApi(ProjectScopedApi):
    credential_scopes = USER_CREDENTIALS_ONLY

    @extend_schema(
        operation_id="api_keys_revoke",
        summary="Revoke a project API key",
        description="Requests carrying the key are refused from now on (401). The key "
        "stays in the list, with `revoked_at`.",
        responses={204: None},
    )
    def delete(self, request, project_id, key_id):
        api_key_revoke(key=api_key_get(project=self.project, key_id=key_id))
        return Response(status=status.HTTP_204_NO_CONTENT)


# --- Usage -----------------------------------------------------------------------------


class UsageQuerySerializer(StrictSerializer):
    # `from` is a Python keyword: the fields are named in __init__ below.
    to = serializers.DateField(required=False, help_text="Last UTC day (default: today).")
    group_by = serializers.ChoiceField(choices=list(USAGE_GROUPS), default="day")

    class Meta:
        ref_name = "UsageQuery"

    def get_fields(self):
        fields = super().get_fields()
        fields["from"] = serializers.DateField(
            required=False,
            help_text="First UTC day (default: 29 days before `to`); after `to`, no day.",
        )
        return fields

    def validate(self, attrs):
        attrs = super().validate(attrs)
        to = attrs.get("to") or timezone.now().date()
        start = attrs.get("from") or max(date.min + timedelta(days=29), to) - timedelta(days=29)
        return {"from": start, "to": to, "group_by": attrs["group_by"]}


class UsageSumsSerializer(serializers.Serializer):
    runs = serializers.IntegerField(help_text="Agent runs (one per assistant message).")
    estimated_runs = serializers.IntegerField(
        help_text="Runs whose provider reported no usage: their tokens are estimated."
    )
    prompt_tokens = serializers.IntegerField()
    completion_tokens = serializers.IntegerField()
    total_tokens = serializers.IntegerField()
    tool_calls = serializers.IntegerField(help_text="Tool calls the model asked for.")
    latency_ms_avg = serializers.FloatField(
        allow_null=True, help_text="Mean time of the provider calls."
    )
    embedding_tokens = serializers.IntegerField(
        help_text="Tokens embedded to store context (ingest), estimated from the text."
    )

    class Meta:
        ref_name = "UsageSums"


class UsageGroupSerializer(UsageSumsSerializer):
    key = serializers.CharField(help_text="The day (YYYY-MM-DD), agent id or model.")

    class Meta:
        ref_name = "UsageGroup"


class UsageOutputSerializer(serializers.Serializer):
    group_by = serializers.ChoiceField(choices=list(USAGE_GROUPS))
    to = serializers.DateField()
    totals = UsageSumsSerializer()
    groups = UsageGroupSerializer(many=True)

    class Meta:
        ref_name = "Usage"

    def get_fields(self):
        fields = super().get_fields()
        fields["from"] = serializers.DateField()
        return fields


@extend_schema(tags=["Governance"])
class UsageApi(ProjectScopedApi):
    @extend_schema(
        operation_id="usage_retrieve",
        summary="A project's usage",
        description="Tokens and runs of the project's agents, by the UTC day each message "
        "was accepted, totalled and grouped by `day`, `agent` (its id) or `model`. Tokens "
        "are those the provider reported, or an estimate from the text where it reported "
        "none (counted in `estimated_runs`). `embedding_tokens`: what storing the agents' "
        "context embedded (by the day it was stored; the model is the embedding model).",
        parameters=[UsageQuerySerializer],
        responses={200: UsageOutputSerializer},
    )
    def get(self, request, project_id):
        query = UsageQuerySerializer(data=request.query_params.dict())
        query.is_valid(raise_exception=True)
        params = query.validated_data
        summary = usage_summary(
            project=self.project,
            date_from=params["from"],
            date_to=params["to"],
            group_by=params["group_by"],
        )
        return Response(UsageOutputSerializer(summary).data)


# --- Quotas ----------------------------------------------------------------------------


class QuotaLimitSerializer(serializers.Serializer):
    limit = serializers.ChoiceField(choices=list(Quota.LIMITS))
    value = serializers.IntegerField(allow_null=True, help_text="The limit; null: none.")
    used = serializers.IntegerField(help_text="What counts against it now.")
    resets_at = serializers.DateTimeField(
        allow_null=True, help_text="When the count starts over; null for concurrent runs."
    )

    class Meta:
        ref_name = "QuotaLimit"


class QuotasOutputSerializer(serializers.Serializer):
    project = QuotaLimitSerializer(many=True, help_text="This project's own limits.")
    user = QuotaLimitSerializer(
        many=True, help_text="The owner's limits, over all their projects together."
    )

    class Meta:
        ref_name = "Quotas"


@extend_schema(tags=["Governance"])
class QuotasApi(ProjectScopedApi):
    @extend_schema(
        operation_id="quotas_retrieve",
        summary="A project's quotas",
        description="The limits operators set on this project and on its owner (tokens "
        "per day and per month, messages per minute, concurrent runs), with what counts "
        "against each now. A message past a limit is refused with a 429 naming the "
        "limit (`limit`, `scope`) and when it resets (`resets_at`).",
        responses={200: QuotasOutputSerializer},
    )
    def get(self, request, project_id):
        status_ = quota_status(project_id=self.project.id, user_id=self.project.owner_id)
        return Response(QuotasOutputSerializer(status_).data)


class QuotaExceededSerializer(ErrorSerializer):
    """A 429: a rate limit (`code` throttled), or a quota (`code` quota_exceeded, with
    the keys below)."""

    scope = serializers.ChoiceField(
        choices=["project", "user"], required=False, help_text="Whose quota."
    )
    limit = serializers.ChoiceField(choices=list(Quota.LIMITS), required=False)
    limit_value = serializers.IntegerField(required=False)
    used = serializers.IntegerField(required=False)
    resets_at = serializers.DateTimeField(
        required=False,
        allow_null=True,
        help_text="When the limit starts over; null for concurrent runs (when one ends).",
    )

    class Meta:
        ref_name = "QuotaExceeded"


QUOTA_EXCEEDED_RESPONSE = OpenApiResponse(
    QuotaExceededSerializer,
    description="Too many requests, or a quota reached: nothing was stored and no agent "
    "runs. `Retry-After` says when to try again.",
)


# --- Provider settings -----------------------------------------------------------------


# http(s)://host[:port][/path...], no whitespace; the host (and port) ASCII as RFC 3986
# spells a registered name, which every URL parser reads the same way (an IPv6 literal
# endpoint needs a host name).
BASE_URL = r"^(https?://[A-Za-z0-9._~%!$&'()*+,;=:-]+([/?#][^ \t\n\r\f\v]*)?)?$"


class ModelNameField(TextField):
    def __init__(self, **kwargs):
        kwargs.setdefault("max_length", 200)
        super().__init__(**kwargs)


class ProviderSettingsInputSerializer(StrictSerializer):
    base_url = TextField(
        max_length=500,
        allow_blank=True,
        validators=[RegexValidator(BASE_URL, "Must be an http or https URL.")],
        help_text="An OpenAI-compatible endpoint (http or https), e.g. "
        "`https://api.openai.com/v1`; empty: the deployment's.",
    )
    api_key = TextField(
        max_length=500,
        allow_blank=True,
        required=False,
        write_only=True,
        help_text="Stored encrypted and never shown again. Omit it to keep the stored "
        "key; an empty string removes it.",
    )
    default_model = ModelNameField(
        allow_blank=True, help_text="For agents without a model; empty: the deployment's."
    )
    allowed_models = serializers.ListField(
        child=ModelNameField(),
        max_length=100,
        help_text="The models the project's agents may ask for, besides `default_model`; "
        "empty: any.",
    )

    class Meta:
        ref_name = "ProviderSettingsInput"


class ProviderSettingsOutputSerializer(serializers.Serializer):
    base_url = serializers.CharField(help_text="Empty: the deployment's endpoint.")
    has_api_key = serializers.BooleanField(
        help_text="Whether the project set a key (the key itself is never shown)."
    )
    default_model = serializers.CharField()
    allowed_models = serializers.ListField(child=serializers.CharField())
    updated_at = serializers.DateTimeField(allow_null=True)

    class Meta:
        ref_name = "ProviderSettings"


@extend_schema(tags=["Governance"])
class ProviderSettingsApi(ProjectScopedApi):
    # A project key may read them (never the API key); only the owner changes them.
    credential_scopes = {"GET": "read", "PUT": None}

    @extend_schema(
        operation_id="provider_settings_retrieve",
        summary="A project's LLM provider settings",
        description="The endpoint, default model and allowed models the project's agents "
        "use; empty fields fall back to the deployment's. The API key is never shown.",
        responses={200: ProviderSettingsOutputSerializer},
    )
    def get(self, request, project_id):
        found = provider_settings_get(project=self.project)
        return Response(ProviderSettingsOutputSerializer(found).data)

    @extend_schema(
        operation_id="provider_settings_update",
        summary="Set a project's LLM provider settings",
        description="Replaces the settings (the API key only when given). Runs that start "
        "after this use them.",
        request=ProviderSettingsInputSerializer,
        responses={200: ProviderSettingsOutputSerializer},
    )
    def put(self, request, project_id):
        data = ProviderSettingsInputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        values = dict(data.validated_data)
        values.setdefault("api_key", KEEP)
        found = provider_settings_update(project=self.project, **values)
        return Response(ProviderSettingsOutputSerializer(found).data)


# --- Audit log -------------------------------------------------------------------------


class AuditEventOutputSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    created_at = serializers.DateTimeField()
    username = serializers.CharField(help_text="Who (their name then; empty: anonymous).")
    credential = serializers.ChoiceField(
        choices=AuditEvent.Credential.choices,
        help_text="How they signed in: user token, session, project API key, or the admin.",
    )
    key_prefix = serializers.CharField(help_text="Which project API key; empty otherwise.")
    method = serializers.CharField()
    path = serializers.CharField()
    action = serializers.CharField(
        help_text="The API route (`POST /my/projects/<uuid:project_id>/agents/`), or the "
        "admin's action and model (`change agents.agent`)."
    )
    object_repr = serializers.CharField(help_text="The admin's name of the object changed.")
    status_code = serializers.IntegerField(allow_null=True)
    ip_address = serializers.CharField(allow_null=True, help_text="The client's address.")

    class Meta:
        ref_name = "AuditEvent"


@extend_schema(tags=["Governance"])
class AuditListApi(EnvelopeListMixin, ProjectScopedApi):
    pagination_class = EnvelopePagination.of("events")
    credential_scopes = {"GET": None}  # the owner's, not a project key's, to read

    @extend_schema(
        operation_id="audit_list",
        summary="A project's audit log",
        description="Every change made to the project through the API or the admin "
        "(who, with which credential, what, when, from where), newest first; records "
        "are kept for the deployment's retention time (AUDIT_RETENTION_DAYS).",
        responses={200: AuditEventOutputSerializer(many=True)},
    )
    def get(self, request, project_id):
        return self.list_response(audit_list(project=self.project), AuditEventOutputSerializer)


# --- Operators' metrics ----------------------------------------------------------------


class MetricsApi(APIView):
    """Prometheus' text format; scraped with a staff user's token (`Bearer`) or session.
    Not in the OpenAPI schema: it is for Prometheus, not for API clients."""

    schema = None
    permission_classes = [IsAdminUser, CredentialScopePermission]

    def get(self, request):
        return HttpResponse(metrics_render(), content_type=CONTENT_TYPE_LATEST)
