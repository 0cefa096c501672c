"""Chat sessions of a project, their messages, and cancelling an answer in flight."""

from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.response import Response

from agents.selectors import agent_list
from common.api import (
    EnvelopeListMixin,
    EnvelopePagination,
    FieldNotFound,
    IntegerInputField,
    StrictSerializer,
    TextField,
    UUIDField,
)
from common.credentials import CHAT
from common.schema import error_responses
from common.validators import MAX_TEXT_BYTES, validate_text_size
from governance.apis import QUOTA_EXCEEDED_RESPONSE
from projects.idempotency import idempotent
from projects.mixins import ProjectScopedApi
from projects.selectors import project_list

from ..models import Message
from ..selectors import message_list, session_get, session_get_with_project, session_list
from ..services import message_send, session_create, session_delete, session_runs_cancel


class SessionOutputSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    project_id = serializers.UUIDField()
    agent_id = serializers.UUIDField()
    agent_version = serializers.IntegerField(
        source="agent_version.number",
        allow_null=True,
        help_text="The agent version the session keeps to; null: the agent as it is.",
    )
    title = serializers.CharField()
    created_at = serializers.DateTimeField()

    class Meta:
        ref_name = "Session"


class SessionInputSerializer(StrictSerializer):
    agent_id = UUIDField(help_text="The agent of this project that answers.")
    title = TextField(max_length=200, allow_blank=True, required=False)
    agent_version = IntegerInputField(
        min_value=1,
        max_value=2**31 - 1,
        required=False,
        allow_null=True,
        help_text="Pin a version of the agent (…/agents/{agent_id}/versions/): the "
        "session's answers use its prompt, model, parameters and tools.",
    )

    class Meta:
        ref_name = "SessionInput"


class MessageOutputSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    session_id = serializers.UUIDField()
    role = serializers.ChoiceField(choices=Message.Role.choices)
    content = serializers.CharField()
    status = serializers.ChoiceField(
        choices=Message.Status.choices,
        help_text="An answer is pending, then streaming, and ends done, error or "
        "cancelled; a regenerated answer's predecessor is superseded.",
    )
    error = serializers.CharField(help_text="Why the message ended in error; empty otherwise.")
    citations = serializers.ListField(
        child=serializers.DictField(),
        help_text="An answer's sources: the context chunks it was given (`index`: the "
        "[n] it was shown as) or its search_context calls found (`index` null), each "
        "with its point `id`, `score` and, for a file's chunk, `document_id`, `source`, "
        "`page` and `section`.",
    )
    created_at = serializers.DateTimeField()

    class Meta:
        ref_name = "Message"


class MessageInputSerializer(StrictSerializer):
    content = TextField(
        max_length=MAX_TEXT_BYTES,
        validators=[validate_text_size],
        help_text=f"At most {MAX_TEXT_BYTES} bytes in UTF-8.",
    )

    class Meta:
        ref_name = "MessageInput"


# One instance renders every accepted message: rendering reads its fields and keeps
# nothing, and a serializer per request deep-copies them (0.15 ms of a chat POST's CPU).
MESSAGE_RENDERER = MessageOutputSerializer()


class MessageAcceptedSerializer(MessageOutputSerializer):
    assistant_message_id = serializers.IntegerField(
        help_text="The assistant message the agent is producing; follow it on …/events/."
    )

    class Meta:
        ref_name = "MessageAccepted"


class CancelOutputSerializer(serializers.Serializer):
    cancelled = serializers.ListField(
        child=serializers.IntegerField(),
        help_text="The assistant messages whose answers this call stopped.",
    )

    class Meta:
        ref_name = "Cancelled"


def _no_such_agent() -> FieldNotFound:
    return FieldNotFound({"agent_id": ["No such agent in this project."]})


@extend_schema(tags=["Chat"])
class SessionListCreateApi(EnvelopeListMixin, ProjectScopedApi):
    pagination_class = EnvelopePagination.of("sessions")

    @extend_schema(
        operation_id="sessions_list",
        summary="List a project's chat sessions",
        description="Newest first.",
        responses={200: SessionOutputSerializer(many=True)},
    )
    def get(self, request, project_id):
        return self.list_response(session_list(project=self.project), SessionOutputSerializer)

    @extend_schema(
        operation_id="sessions_create",
        summary="Start a chat session with an agent",
        request=SessionInputSerializer,
        responses={
            201: SessionOutputSerializer,
            **error_responses(
                404,
                _404="No such project, `agent_id` names no agent of this project, or "
                "`agent_version` no version of it.",
            ),
        },
    )
    def post(self, request, project_id):
        data = SessionInputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        agent = agent_list(project=self.project).filter(id=data.validated_data["agent_id"]).first()
        if agent is None:
            raise _no_such_agent()
        version = None
        if data.validated_data.get("agent_version") is not None:
            version = agent.versions.filter(number=data.validated_data["agent_version"]).first()
            if version is None:
                raise FieldNotFound({"agent_version": ["No such version of this agent."]})
        session = session_create(
            project=self.project,
            agent=agent,
            title=data.validated_data.get("title", ""),
            agent_version=version,
        )
        return Response(SessionOutputSerializer(session).data, status=status.HTTP_201_CREATED)


@extend_schema(tags=["Chat"])
class SessionDetailApi(ProjectScopedApi):
    @extend_schema(
        operation_id="sessions_retrieve",
        summary="Get a chat session",
        responses={200: SessionOutputSerializer},
    )
    def get(self, request, project_id, session_id):
        session = session_get(project=self.project, session_id=session_id)
        return Response(SessionOutputSerializer(session).data)

    @extend_schema(
        operation_id="sessions_destroy",
        summary="Delete a chat session",
        description="Deletes the session, its messages and its event stream.",
        responses={204: None},
    )
    def delete(self, request, project_id, session_id):
        session_delete(session=session_get(project=self.project, session_id=session_id))
        return Response(status=status.HTTP_204_NO_CONTENT)


@extend_schema(tags=["Chat"])
class MessageListCreateApi(EnvelopeListMixin, ProjectScopedApi):
    pagination_class = EnvelopePagination.of("messages")
    throttle_scopes = {"POST": "messages"}
    credential_scopes = {"POST": CHAT}  # a project API key sends messages with `chat`
    project_read_by_handler = frozenset({"POST"})  # with the session: one query

    @extend_schema(
        operation_id="messages_list",
        summary="List a session's messages",
        description="In conversation order, oldest first; an answer still being written "
        "shows its status (`pending`, `streaming`).",
        responses={200: MessageOutputSerializer(many=True)},
    )
    def get(self, request, project_id, session_id):
        session = session_get(project=self.project, session_id=session_id)
        return self.list_response(message_list(session=session), MessageOutputSerializer)

    @extend_schema(
        operation_id="messages_create",
        summary="Send a message; the agent answers through the bus",
        description="Stores the message and a pending assistant message (its id is "
        "`assistant_message_id`), and puts the answer on the project's queue. Follow the "
        "answer on the session's event stream (open it before posting, or read it with "
        "`?cursor=0`), or poll the messages. Every accepted message is answered or ends "
        "`error` with the reason. While an answer of the session is in flight, the "
        "agent's `busy_policy` decides: `enqueue` answers this one after it, "
        "`interrupt` cancels it first, `reject` answers 409 and stores nothing. A "
        "message past one of the project's or its owner's quotas is refused (429, naming "
        "the limit and when it resets).",
        request=MessageInputSerializer,
        responses={
            202: MessageAcceptedSerializer,
            **error_responses(409, _409="An answer is in flight (busy_policy `reject`)."),
            429: QUOTA_EXCEEDED_RESPONSE,
        },
    )
    @idempotent
    def post(self, request, project_id, session_id):
        session = session_get_with_project(
            projects=project_list(user=request.user, credential=request.auth),
            project_id=project_id,
            session_id=session_id,
        )
        if session is None:  # the project's 404, else the session's
            session = session_get(project=self.project, session_id=session_id)
        self.project = session.project
        data = MessageInputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        message, answer = message_send(session=session, content=data.validated_data["content"])
        body = {**MESSAGE_RENDERER.to_representation(message), "assistant_message_id": answer.id}
        return Response(body, status=status.HTTP_202_ACCEPTED)


@extend_schema(tags=["Chat"])
class SessionCancelApi(ProjectScopedApi):
    credential_scopes = {"POST": CHAT}

    @extend_schema(
        operation_id="sessions_cancel",
        summary="Stop the answers in flight",
        description="Stops the session's queued and streaming answers (they end "
        "`cancelled`): 202 with the ids it stopped, or 200 with none when nothing ran.",
        request=None,
        responses={200: CancelOutputSerializer, 202: CancelOutputSerializer},
    )
    def post(self, request, project_id, session_id):
        session = session_get(project=self.project, session_id=session_id)
        cancelled = session_runs_cancel(session=session)
        code = status.HTTP_202_ACCEPTED if cancelled else status.HTTP_200_OK
        return Response({"cancelled": cancelled}, status=code)
