"""Agents of a project: list, create, read, change, delete."""

from django.db import IntegrityError
from drf_spectacular.utils import extend_schema, extend_schema_field
from rest_framework import serializers, status
from rest_framework.response import Response

from common.api import (
    Conflict,
    EnvelopeListMixin,
    EnvelopePagination,
    StrictSerializer,
    TextField,
)
from common.schema import error_responses
from common.validators import MAX_TEXT_BYTES, validate_text_size
from projects.mixins import ProjectScopedApi

from ..models import Agent
from ..selectors import agent_get, agent_list
from ..services import agent_create, agent_delete, agent_update
from ..validators import MAX_PARAMS_BYTES, PARAM_RANGES, validate_params


def _params_schema() -> dict:
    properties = {}
    for key, (kind, low, high) in PARAM_RANGES.items():
        properties[key] = {
            "type": "integer" if kind is int else "number",
            "minimum": low,
            "maximum": high,
        }
    return {
        "type": "object",
        "properties": properties,
        "additionalProperties": True,
        "description": "Model parameters: temperature, top_p, max_tokens and "
        "presence/frequency_penalty go to the model; top_k is how many context chunks "
        "the agent retrieves; max_steps how many times a run may ask the model (each "
        "turn that calls tools is one). Other keys are kept as given. "
        f"At most {MAX_PARAMS_BYTES} bytes as JSON.",
    }


@extend_schema_field(_params_schema())
class ParamsField(serializers.JSONField):
    pass


class AgentOutputSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    project_id = serializers.UUIDField()
    name = serializers.CharField()
    system_prompt = serializers.CharField()
    model = serializers.CharField(
        help_text="The model it asks; empty: the server's default (LLM_DEFAULT_MODEL)."
    )
    params = ParamsField()
    busy_policy = serializers.ChoiceField(choices=Agent.BusyPolicy.choices)
    created_at = serializers.DateTimeField()
    updated_at = serializers.DateTimeField()

    class Meta:
        ref_name = "Agent"


class AgentInputSerializer(StrictSerializer):
    name = TextField(max_length=200, help_text="Unique within the project.")
    system_prompt = TextField(
        allow_blank=True,
        required=False,
        max_length=MAX_TEXT_BYTES,
        validators=[validate_text_size],
        help_text=f"At most {MAX_TEXT_BYTES} bytes in UTF-8.",
    )
    model = TextField(
        max_length=200,
        allow_blank=True,
        required=False,
        help_text="A model the LLM endpoint serves; empty: the server's default.",
    )
    params = ParamsField(required=False, validators=[validate_params])
    busy_policy = serializers.ChoiceField(
        choices=Agent.BusyPolicy.choices,
        required=False,
        help_text="A message that arrives while an answer of its session is in flight: "
        "`reject` refuses it (409), `enqueue` (the default) answers it after, "
        "`interrupt` cancels the answer in flight and answers it.",
    )

    class Meta:
        ref_name = "AgentInput"


def _name_taken() -> Conflict:
    return Conflict({"name": ["An agent with this name exists in the project."]})


_CONFLICT = error_responses(409, _409="An agent with this name exists in the project.")


@extend_schema(tags=["Agents"])
class AgentListCreateApi(EnvelopeListMixin, ProjectScopedApi):
    pagination_class = EnvelopePagination.of("agents")

    @extend_schema(
        operation_id="agents_list",
        summary="List a project's agents",
        description="Oldest first.",
        responses={200: AgentOutputSerializer(many=True)},
    )
    def get(self, request, project_id):
        return self.list_response(agent_list(project=self.project), AgentOutputSerializer)

    @extend_schema(
        operation_id="agents_create",
        summary="Create an agent",
        description="An agent answers chat messages with its system prompt, model and "
        "parameters, from what its context memory holds.",
        request=AgentInputSerializer,
        responses={201: AgentOutputSerializer, **_CONFLICT},
    )
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


@extend_schema(tags=["Agents"])
class AgentDetailApi(ProjectScopedApi):
    @extend_schema(
        operation_id="agents_retrieve",
        summary="Get an agent",
        responses={200: AgentOutputSerializer},
    )
    def get(self, request, project_id, agent_id):
        agent = agent_get(project=self.project, agent_id=agent_id)
        return Response(AgentOutputSerializer(agent).data)

    @extend_schema(
        operation_id="agents_update",
        summary="Change an agent",
        description="Changes only the fields given; the next answer uses them.",
        request=AgentInputSerializer,
        responses={200: AgentOutputSerializer, **_CONFLICT},
    )
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

    @extend_schema(
        operation_id="agents_destroy",
        summary="Delete an agent",
        description="Deletes the agent, its chat sessions and its context memory.",
        responses={204: None},
    )
    def delete(self, request, project_id, agent_id):
        agent_delete(agent=agent_get(project=self.project, agent_id=agent_id))
        return Response(status=status.HTTP_204_NO_CONTENT)
