"""A session's runs (one per answer): what each did, step by step; cancelling one;
answering the last question again."""

from drf_spectacular.utils import extend_schema, extend_schema_field
from rest_framework import serializers, status
from rest_framework.response import Response

from common.api import EnvelopeListMixin, EnvelopePagination
from common.credentials import CHAT
from common.schema import error_responses
from governance.apis import QUOTA_EXCEEDED_RESPONSE
from projects.mixins import ProjectScopedApi

from ..models import Run
from ..selectors import run_get, run_list, session_get
from ..services import answer_regenerate, session_run_cancel
from .chat import MessageOutputSerializer

_STEP = {
    "type": "object",
    "required": ["type", "attempt", "step"],
    "properties": {
        "type": {"type": "string", "enum": ["tool"]},
        "child_run_id": {
            "type": "string",
            "format": "uuid",
            "description": "Agent tools: the run of the agent it asked.",
        },
        "child_session_id": {"type": "string", "format": "uuid"},
        "attempt": {"type": "integer", "description": "The run's dispatch generation."},
        "step": {"type": "integer", "description": "The model turn that asked for it."},
        "call_id": {"type": "string"},
        "name": {"type": "string"},
        "arguments": {"type": "string", "description": "JSON text, cut."},
        "safe_to_repeat": {"type": "boolean"},
        "status": {"type": "string", "enum": ["started", "done", "error"]},
        "result": {"type": "string", "description": "Cut to TOOL_EVENT_MAX_CHARS."},
        "started_at": {"type": "string", "format": "date-time"},
        "finished_at": {"type": "string", "format": "date-time"},
    },
}


@extend_schema_field({"type": "array", "items": _STEP})
class StepsField(serializers.JSONField):
    pass


class RunOutputSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    session_id = serializers.UUIDField()
    message_id = serializers.IntegerField(help_text="The assistant message it produces.")
    agent_id = serializers.UUIDField()
    agent_version = serializers.IntegerField(
        source="agent_version.number",
        allow_null=True,
        help_text="The agent version it answered with (…/agents/{agent_id}/versions/).",
    )
    status = serializers.ChoiceField(choices=Run.Status.choices)
    error = serializers.CharField(help_text="Why it ended in error; empty otherwise.")
    model = serializers.CharField(help_text="The model it asked; empty before it started.")
    steps = StepsField(help_text="The tool calls it made, in order.")
    starts = serializers.IntegerField(help_text="How many times a worker started it.")
    parent_id = serializers.UUIDField(
        allow_null=True,
        help_text="The run of another agent that asked this one (an agent tool); null "
        "for an answer to a user.",
    )
    depth = serializers.IntegerField(help_text="0 for an answer to a user; +1 per call.")
    created_at = serializers.DateTimeField()
    started_at = serializers.DateTimeField(allow_null=True)
    finished_at = serializers.DateTimeField(allow_null=True)

    class Meta:
        ref_name = "Run"


class RunCancelOutputSerializer(serializers.Serializer):
    cancelled = serializers.BooleanField(help_text="Whether this call stopped the run.")
    run = RunOutputSerializer()

    class Meta:
        ref_name = "RunCancelled"


@extend_schema(tags=["Chat"])
class RunListApi(EnvelopeListMixin, ProjectScopedApi):
    pagination_class = EnvelopePagination.of("runs")

    @extend_schema(
        operation_id="runs_list",
        summary="List a session's runs",
        description="One run per answer, newest first.",
        responses={200: RunOutputSerializer(many=True)},
    )
    def get(self, request, project_id, session_id):
        session = session_get(project=self.project, session_id=session_id)
        return self.list_response(run_list(session=session), RunOutputSerializer)


@extend_schema(tags=["Chat"])
class RunDetailApi(ProjectScopedApi):
    @extend_schema(
        operation_id="runs_retrieve",
        summary="Get a run",
        responses={200: RunOutputSerializer},
    )
    def get(self, request, project_id, session_id, run_id):
        session = session_get(project=self.project, session_id=session_id)
        return Response(RunOutputSerializer(run_get(session=session, run_id=run_id)).data)


@extend_schema(tags=["Chat"])
class RunCancelApi(ProjectScopedApi):
    credential_scopes = {"POST": CHAT}  # a project API key stops a run with `chat`

    @extend_schema(
        operation_id="runs_cancel",
        summary="Stop a run",
        description="Stops the run if it is queued or running (it ends `cancelled`): 202; "
        "200 when it had already ended. The session's next waiting answer then starts.",
        request=None,
        responses={200: RunCancelOutputSerializer, 202: RunCancelOutputSerializer},
    )
    def post(self, request, project_id, session_id, run_id):
        session = session_get(project=self.project, session_id=session_id)
        run = run_get(session=session, run_id=run_id)
        cancelled = session_run_cancel(run=run)
        run.refresh_from_db()
        body = {"cancelled": cancelled, "run": RunOutputSerializer(run).data}
        return Response(body, status=status.HTTP_202_ACCEPTED if cancelled else status.HTTP_200_OK)


@extend_schema(tags=["Chat"])
class RegenerateApi(ProjectScopedApi):
    throttle_scopes = {"POST": "messages"}
    credential_scopes = {"POST": CHAT}  # an answer, as a message is

    @extend_schema(
        operation_id="sessions_regenerate",
        summary="Answer the last question again",
        description="The session's last answer (finished) becomes `superseded`, out of "
        "the conversation; a new pending answer takes its place, followed on the event "
        "stream like any other. 409 when the last message is not a finished answer; "
        "429 past one of the project's or its owner's quotas, as for a message.",
        request=None,
        responses={
            202: MessageOutputSerializer,
            **error_responses(409, _409="The last message is not a finished answer."),
            429: QUOTA_EXCEEDED_RESPONSE,
        },
    )
    def post(self, request, project_id, session_id):
        session = session_get(project=self.project, session_id=session_id)
        answer = answer_regenerate(session=session)
        return Response(MessageOutputSerializer(answer).data, status=status.HTTP_202_ACCEPTED)
