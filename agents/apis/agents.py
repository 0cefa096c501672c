"""Agents of a project: list, create, read, change, delete."""

from django.db import IntegrityError
from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.response import Response

from common.api import EnvelopeListMixin, EnvelopePagination, StrictSerializer
from common.validators import validate_text_size
from projects.mixins import ProjectScopedApi

from ..selectors import agent_get, agent_list
from ..services import agent_create, agent_delete, agent_update
from ..validators import validate_params


class AgentOutputSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    project_id = serializers.UUIDField()
    name = serializers.CharField()
    system_prompt = serializers.CharField()
    model = serializers.CharField()
    params = serializers.JSONField()
    created_at = serializers.DateTimeField()
    updated_at = serializers.DateTimeField()


class AgentInputSerializer(StrictSerializer):
    name = serializers.CharField(max_length=200)
    system_prompt = serializers.CharField(
        allow_blank=True, required=False, validators=[validate_text_size]
    )
    model = serializers.CharField(max_length=200, allow_blank=True, required=False)
    params = serializers.JSONField(required=False, validators=[validate_params])


def _name_taken() -> serializers.ValidationError:
    return serializers.ValidationError({"name": ["An agent with this name exists in the project."]})


class AgentListCreateApi(EnvelopeListMixin, ProjectScopedApi):
    pagination_class = EnvelopePagination.of("agents")

    @extend_schema(responses=AgentOutputSerializer(many=True))
    def get(self, request, project_id):
        return self.list_response(agent_list(project=self.project), AgentOutputSerializer)

    @extend_schema(request=AgentInputSerializer, responses={201: AgentOutputSerializer})
    def post(self, request, project_id):
        data = AgentInputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        if agent_list(project=self.project).filter(name=data.validated_data["name"]).exists():
            raise _name_taken()
        try:
            agent = agent_create(project=self.project, **data.validated_data)
        except IntegrityError:  # a concurrent create took the name
            raise _name_taken() from None
        return Response(AgentOutputSerializer(agent).data, status=status.HTTP_201_CREATED)


class AgentDetailApi(ProjectScopedApi):
    @extend_schema(responses=AgentOutputSerializer)
    def get(self, request, project_id, agent_id):
        agent = agent_get(project=self.project, agent_id=agent_id)
        return Response(AgentOutputSerializer(agent).data)

    @extend_schema(request=AgentInputSerializer, responses=AgentOutputSerializer)
    def patch(self, request, project_id, agent_id):
        agent = agent_get(project=self.project, agent_id=agent_id)
        data = AgentInputSerializer(data=request.data, partial=True)
        data.is_valid(raise_exception=True)
        name = data.validated_data.get("name")
        if name and agent_list(project=self.project).filter(name=name).exclude(id=agent.id):
            raise _name_taken()
        try:
            agent = agent_update(agent=agent, data=data.validated_data)
        except IntegrityError:
            raise _name_taken() from None
        return Response(AgentOutputSerializer(agent).data)

    @extend_schema(responses={204: None})
    def delete(self, request, project_id, agent_id):
        agent_delete(agent=agent_get(project=self.project, agent_id=agent_id))
        return Response(status=status.HTTP_204_NO_CONTENT)
