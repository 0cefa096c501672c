import json

from django.db import IntegrityError
from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.response import Response

from config.api import StrictSerializer, list_response, validate_text_size
from workspaces.mixins import WorkerSpaceMixin

from .selectors import agent_get, agent_list, message_list, session_get, session_list
from .services import (
    agent_create,
    agent_delete,
    agent_update,
    message_create,
    session_create,
    session_delete,
)

MAX_PARAMS_BYTES = 8 * 1024
# Known parameters and their allowed ranges; others are kept as given.
PARAM_RANGES = {
    "temperature": (float, 0.0, 2.0),
    "top_p": (float, 0.0, 1.0),
    "max_tokens": (int, 1, 131072),
    "top_k": (int, 0, 100),
}


def validate_params(value):
    if not isinstance(value, dict):
        raise serializers.ValidationError("Must be a JSON object.")
    if len(json.dumps(value).encode()) > MAX_PARAMS_BYTES:
        raise serializers.ValidationError(f"Must be at most {MAX_PARAMS_BYTES} bytes as JSON.")
    errors = {}
    for key, (kind, low, high) in PARAM_RANGES.items():
        if key not in value:
            continue
        v = value[key]
        ok_type = isinstance(v, int | float) if kind is float else isinstance(v, int)
        if isinstance(v, bool) or not ok_type or not low <= v <= high:
            kind_name = "an integer" if kind is int else "a number"
            errors[key] = f"Must be {kind_name} in [{low}, {high}]."
    if errors:
        raise serializers.ValidationError(errors)
    return value


# --- Agents ------------------------------------------------------------------------


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


class AgentListCreateApi(WorkerSpaceMixin):
    @extend_schema(responses=AgentOutputSerializer(many=True))
    def get(self, request, project_id):
        return list_response(
            request=request,
            queryset=agent_list(project=self.project),
            serializer_class=AgentOutputSerializer,
            key="agents",
        )

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


class AgentDetailApi(WorkerSpaceMixin):
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


# --- Chat sessions and messages ------------------------------------------------------


class SessionOutputSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    project_id = serializers.UUIDField()
    agent_id = serializers.UUIDField()
    title = serializers.CharField()
    created_at = serializers.DateTimeField()


class SessionInputSerializer(StrictSerializer):
    agent_id = serializers.UUIDField()
    title = serializers.CharField(max_length=200, allow_blank=True, required=False)


class MessageOutputSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    session_id = serializers.UUIDField()
    role = serializers.CharField()
    content = serializers.CharField()
    status = serializers.CharField()
    error = serializers.CharField()
    created_at = serializers.DateTimeField()


class MessageInputSerializer(StrictSerializer):
    content = serializers.CharField(validators=[validate_text_size])


class SessionListCreateApi(WorkerSpaceMixin):
    @extend_schema(responses=SessionOutputSerializer(many=True))
    def get(self, request, project_id):
        return list_response(
            request=request,
            queryset=session_list(project=self.project),
            serializer_class=SessionOutputSerializer,
            key="sessions",
        )

    @extend_schema(request=SessionInputSerializer, responses={201: SessionOutputSerializer})
    def post(self, request, project_id):
        data = SessionInputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        agent = agent_list(project=self.project).filter(id=data.validated_data["agent_id"]).first()
        if agent is None:
            raise serializers.ValidationError({"agent_id": ["No such agent in this project."]})
        session = session_create(
            project=self.project, agent=agent, title=data.validated_data.get("title", "")
        )
        return Response(SessionOutputSerializer(session).data, status=status.HTTP_201_CREATED)


class SessionDetailApi(WorkerSpaceMixin):
    @extend_schema(responses=SessionOutputSerializer)
    def get(self, request, project_id, session_id):
        session = session_get(project=self.project, session_id=session_id)
        return Response(SessionOutputSerializer(session).data)

    @extend_schema(responses={204: None})
    def delete(self, request, project_id, session_id):
        session_delete(session=session_get(project=self.project, session_id=session_id))
        return Response(status=status.HTTP_204_NO_CONTENT)


class MessageListCreateApi(WorkerSpaceMixin):
    @extend_schema(responses=MessageOutputSerializer(many=True))
    def get(self, request, project_id, session_id):
        session = session_get(project=self.project, session_id=session_id)
        return list_response(
            request=request,
            queryset=message_list(session=session),
            serializer_class=MessageOutputSerializer,
            key="messages",
        )

    @extend_schema(request=MessageInputSerializer, responses={202: MessageOutputSerializer})
    def post(self, request, project_id, session_id):
        session = session_get(project=self.project, session_id=session_id)
        data = MessageInputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        message = message_create(session=session, content=data.validated_data["content"])
        return Response(MessageOutputSerializer(message).data, status=status.HTTP_202_ACCEPTED)
