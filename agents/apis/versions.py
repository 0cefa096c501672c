"""An agent's versions: list, read, compare, roll back."""

from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.response import Response

from common.api import EnvelopeListMixin, EnvelopePagination, StrictSerializer
from common.selectors import get_or_404
from projects.mixins import ProjectScopedApi

from ..models import AgentVersion
from ..selectors import agent_get
from ..services import agent_version_rollback
from ..versions import agent_version_diff


class AgentVersionOutputSerializer(serializers.Serializer):
    number = serializers.IntegerField(help_text="1, 2, 3… per agent.")
    agent_id = serializers.UUIDField()
    name = serializers.CharField(help_text="The agent's name when the version was made.")
    system_prompt = serializers.CharField()
    model = serializers.CharField()
    params = serializers.JSONField()
    busy_policy = serializers.CharField()
    tools = serializers.JSONField(
        help_text="The agent's tools as they were (headers keep secret names, never values)."
    )
    sections = serializers.JSONField(
        help_text="Parts of the definition other features add (e.g. memory blocks)."
    )
    restored_from = serializers.IntegerField(
        allow_null=True, help_text="A rollback: the version it restored."
    )
    created_at = serializers.DateTimeField()

    class Meta:
        ref_name = "AgentVersion"


class AgentVersionDiffSerializer(serializers.Serializer):
    from_version = serializers.IntegerField()
    to_version = serializers.IntegerField()
    fields = serializers.DictField(
        child=serializers.JSONField(),
        help_text="Each changed field of system_prompt, model, params, busy_policy: "
        '{"from": …, "to": …}.',
    )
    system_prompt_diff = serializers.CharField(help_text="The prompt as a unified diff.")
    tools_added = serializers.ListField(child=serializers.CharField())
    tools_removed = serializers.ListField(child=serializers.CharField())
    tools_changed = serializers.DictField(
        child=serializers.JSONField(), help_text='Per tool name, its changed fields {"from", "to"}.'
    )
    sections = serializers.DictField(child=serializers.JSONField())

    class Meta:
        ref_name = "AgentVersionDiff"


class DiffQuerySerializer(StrictSerializer):
    against = serializers.IntegerField(
        min_value=1,
        max_value=2**31 - 1,
        required=False,
        help_text="The version to compare with; default: the one before.",
    )


class RollbackInputSerializer(StrictSerializer):
    class Meta:
        ref_name = "AgentRollbackInput"


class RollbackOutputSerializer(serializers.Serializer):
    version = AgentVersionOutputSerializer(help_text="The new version, equal to the one restored.")
    tools_not_restored = serializers.ListField(
        child=serializers.CharField(),
        help_text="Agent tools whose target agent has been deleted since.",
    )

    class Meta:
        ref_name = "AgentRollback"


def _versions(agent):
    return AgentVersion.objects.filter(agent=agent).order_by("-number")


def _version_get(agent, number) -> AgentVersion:
    return get_or_404(_versions(agent), number=number)


@extend_schema(tags=["Agents"])
class AgentVersionListApi(EnvelopeListMixin, ProjectScopedApi):
    pagination_class = EnvelopePagination.of("versions")

    @extend_schema(
        operation_id="agent_versions_list",
        summary="List an agent's versions",
        description="Newest first. Every change to the agent's prompt, model, parameters, "
        "busy policy or tools made one; versions never change.",
        responses={200: AgentVersionOutputSerializer(many=True)},
    )
    def get(self, request, project_id, agent_id):
        agent = agent_get(project=self.project, agent_id=agent_id)
        return self.list_response(_versions(agent), AgentVersionOutputSerializer)


@extend_schema(tags=["Agents"])
class AgentVersionDetailApi(ProjectScopedApi):
    @extend_schema(
        operation_id="agent_versions_retrieve",
        summary="Get one version of an agent",
        responses={200: AgentVersionOutputSerializer},
    )
    def get(self, request, project_id, agent_id, number):
        agent = agent_get(project=self.project, agent_id=agent_id)
        return Response(AgentVersionOutputSerializer(_version_get(agent, number)).data)


@extend_schema(tags=["Agents"])
class AgentVersionDiffApi(ProjectScopedApi):
    @extend_schema(
        operation_id="agent_versions_diff",
        summary="Compare two versions of an agent",
        description="What changed from `against` (default: the version before) to this one.",
        parameters=[DiffQuerySerializer],
        responses={200: AgentVersionDiffSerializer},
    )
    def get(self, request, project_id, agent_id, number):
        query = DiffQuerySerializer(data=request.query_params.dict())
        query.is_valid(raise_exception=True)
        agent = agent_get(project=self.project, agent_id=agent_id)
        version = _version_get(agent, number)
        against = query.validated_data.get("against", max(number - 1, 1))
        old = _version_get(agent, against)
        return Response(AgentVersionDiffSerializer(agent_version_diff(old, version)).data)


@extend_schema(tags=["Agents"])
class AgentVersionRollbackApi(ProjectScopedApi):
    @extend_schema(
        operation_id="agent_versions_rollback",
        summary="Roll an agent back to a version",
        description="Makes the agent (prompt, model, parameters, busy policy, tools) what "
        "this version was, as a new version: history is never rewritten. The next "
        "answer uses it. Sessions pinned to a version keep theirs.",
        request=RollbackInputSerializer,
        responses={201: RollbackOutputSerializer},
    )
    def post(self, request, project_id, agent_id, number):
        RollbackInputSerializer(data=request.data).is_valid(raise_exception=True)
        agent = agent_get(project=self.project, agent_id=agent_id)
        version = _version_get(agent, number)
        new, skipped = agent_version_rollback(agent=agent, version=version)
        body = {"version": new, "tools_not_restored": skipped}
        return Response(RollbackOutputSerializer(body).data, status=status.HTTP_201_CREATED)
