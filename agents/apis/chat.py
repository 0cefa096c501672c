"""Chat sessions of a project, their messages, and cancelling an answer in flight."""

from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.response import Response

from common.api import EnvelopeListMixin, EnvelopePagination, StrictSerializer
from common.validators import validate_text_size
from projects.mixins import ProjectScopedApi

from ..selectors import agent_list, message_list, session_get, session_list
from ..services import message_create, session_create, session_delete, session_runs_cancel


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


class MessageAcceptedSerializer(MessageOutputSerializer):
    assistant_message_id = serializers.IntegerField(
        help_text="The assistant message the agent is producing; follow it on …/events/."
    )


class SessionListCreateApi(EnvelopeListMixin, ProjectScopedApi):
    pagination_class = EnvelopePagination.of("sessions")

    @extend_schema(responses=SessionOutputSerializer(many=True))
    def get(self, request, project_id):
        return self.list_response(session_list(project=self.project), SessionOutputSerializer)

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


class SessionDetailApi(ProjectScopedApi):
    @extend_schema(responses=SessionOutputSerializer)
    def get(self, request, project_id, session_id):
        session = session_get(project=self.project, session_id=session_id)
        return Response(SessionOutputSerializer(session).data)

    @extend_schema(responses={204: None})
    def delete(self, request, project_id, session_id):
        session_delete(session=session_get(project=self.project, session_id=session_id))
        return Response(status=status.HTTP_204_NO_CONTENT)


class MessageListCreateApi(EnvelopeListMixin, ProjectScopedApi):
    pagination_class = EnvelopePagination.of("messages")
    throttle_scopes = {"POST": "messages"}

    @extend_schema(responses=MessageOutputSerializer(many=True))
    def get(self, request, project_id, session_id):
        session = session_get(project=self.project, session_id=session_id)
        return self.list_response(message_list(session=session), MessageOutputSerializer)

    @extend_schema(request=MessageInputSerializer, responses={202: MessageAcceptedSerializer})
    def post(self, request, project_id, session_id):
        session = session_get(project=self.project, session_id=session_id)
        data = MessageInputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        message, answer = message_create(session=session, content=data.validated_data["content"])
        body = {**MessageOutputSerializer(message).data, "assistant_message_id": answer.id}
        return Response(body, status=status.HTTP_202_ACCEPTED)


class CancelOutputSerializer(serializers.Serializer):
    cancelled = serializers.ListField(child=serializers.IntegerField())


class SessionCancelApi(ProjectScopedApi):
    """Stop the session's in-flight answers: 202 when some were stopped, 200 when none ran."""

    @extend_schema(
        request=None, responses={200: CancelOutputSerializer, 202: CancelOutputSerializer}
    )
    def post(self, request, project_id, session_id):
        session = session_get(project=self.project, session_id=session_id)
        cancelled = session_runs_cancel(session=session)
        code = status.HTTP_202_ACCEPTED if cancelled else status.HTTP_200_OK
        return Response({"cancelled": cancelled}, status=code)
