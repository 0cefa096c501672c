"""A project's governance: its API keys (usage and quotas: below)."""

from __future__ import annotations

from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.response import Response

from common.api import EnvelopeListMixin, EnvelopePagination, StrictSerializer, TextField
from common.credentials import SCOPES
from projects.mixins import ProjectScopedApi

from .selectors import api_key_get, api_key_list
from .services import api_key_create, api_key_revoke

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
