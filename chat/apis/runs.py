"""A session's runs (one per answer): what each did, step by step; cancelling one;
answering the last question again."""

from drf_spectacular.utils import extend_schema, extend_schema_field
from rest_framework import serializers, status
from rest_framework.response import Response

from common.api import (
    EnvelopeListMixin,
    EnvelopePagination,
    StrictSerializer,
    TextField,
    error_body,
)
from common.credentials import CHAT
from common.schema import error_responses
from governance.apis import QUOTA_EXCEEDED_RESPONSE
from projects.idempotency import idempotent
from projects.mixins import ProjectScopedApi

from ..models import Run
from ..selectors import project_run_get, run_get, run_list, session_get
from ..services import answer_regenerate, run_approve, run_reject, session_run_cancel
from ..suspend import ApprovalRefused
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
        "status": {
            "type": "string",
            "enum": ["awaiting-approval", "waiting", "started", "done", "error"],
            "description": "`awaiting-approval`: the run waits for its owner to approve "
            "or reject this call; `waiting`: another call of its step, or the agent it "
            "asked, is waited for.",
        },
        "edited": {"type": "boolean", "description": "Its arguments were edited at approval."},
        "result": {"type": "string", "description": "Cut to TOOL_EVENT_MAX_CHARS."},
        "started_at": {"type": "string", "format": "date-time"},
        "finished_at": {"type": "string", "format": "date-time"},
    },
}


@extend_schema_field({"type": "array", "items": _STEP})
class StepsField(serializers.JSONField):
    pass


class WaitingOutputSerializer(serializers.Serializer):
    reason = serializers.ChoiceField(
        choices=[("approval", "approval"), ("agents", "agents")],
        help_text="`approval`: a tool call waits for the owner (POST .../approve/ or "
        ".../reject/); `agents`: the agents it asked are answering.",
    )
    step = serializers.IntegerField(help_text="The model turn whose calls it waits for.")
    call_ids = serializers.ListField(
        child=serializers.CharField(),
        help_text="The calls awaiting approval (their arguments: in `steps`).",
    )
    waiting_until = serializers.DateTimeField(
        allow_null=True, help_text="Past it the run ends in error."
    )

    class Meta:
        ref_name = "RunWaiting"

    def to_representation(self, run: Run) -> dict:
        suspended = run.suspended or {}
        return {
            "reason": suspended.get("reason", ""),
            "step": suspended.get("step", 0),
            "call_ids": list(suspended.get("approval") or ()),
            "waiting_until": serializers.DateTimeField().to_representation(run.waiting_until)
            if run.waiting_until
            else None,
        }


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
    waiting = serializers.SerializerMethodField(
        help_text="While `status` is `waiting` (stored, holding no worker): what for."
    )
    trace_id = serializers.CharField(
        help_text="The OpenTelemetry trace of the message it answers (32 hex digits; "
        "search the tracing backend and the logs by it); empty when tracing is off."
    )
    created_at = serializers.DateTimeField()
    started_at = serializers.DateTimeField(allow_null=True)
    finished_at = serializers.DateTimeField(allow_null=True)

    class Meta:
        ref_name = "Run"

    @extend_schema_field(WaitingOutputSerializer(allow_null=True))
    def get_waiting(self, run: Run) -> dict | None:
        if run.status != Run.Status.WAITING or not run.suspended:
            return None
        return WaitingOutputSerializer(run).data


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
    @idempotent
    def post(self, request, project_id, session_id):
        session = session_get(project=self.project, session_id=session_id)
        answer = answer_regenerate(session=session)
        return Response(MessageOutputSerializer(answer).data, status=status.HTTP_202_ACCEPTED)


# --- Approval of a waiting run's tool calls ---------------------------------------------


@extend_schema_field({"type": "object", "additionalProperties": True})
class ObjectField(serializers.JSONField):
    """A JSON object (drf-spectacular would describe a JSONField as any value)."""

    def to_internal_value(self, data):
        if not isinstance(data, dict):
            raise serializers.ValidationError("Must be a JSON object.")
        return super().to_internal_value(data)


class ApproveInputSerializer(StrictSerializer):
    arguments = ObjectField(
        required=False,
        help_text="The call's arguments as they are to be made (a JSON object checked "
        "against the tool's parameters schema); omitted: as the model wrote them.",
    )
    call_id = TextField(
        required=False,
        max_length=200,
        help_text="Which call `arguments` are for; needed only when the run waits for several.",
    )

    class Meta:
        ref_name = "RunApproveInput"


class RejectInputSerializer(StrictSerializer):
    reason = TextField(
        max_length=2000,
        help_text="Why: the model is told, as the calls' result, and may answer otherwise.",
    )

    class Meta:
        ref_name = "RunRejectInput"


_NOT_WAITING = error_responses(
    409,
    _409="The run does not wait for an approval (any more: decided, cancelled, "
    "timed out, or it waits for other agents).",
)


def _refused(exc: ApprovalRefused) -> Response:
    if exc.field:
        body = error_body(400, str(exc), fields={exc.field: [str(exc)]})
        return Response(body, status=status.HTTP_400_BAD_REQUEST)
    return Response(error_body(409, str(exc)), status=status.HTTP_409_CONFLICT)


@extend_schema(tags=["Chat"])
class RunApproveApi(ProjectScopedApi):
    credential_scopes = {"POST": CHAT}

    @extend_schema(
        operation_id="runs_approve",
        summary="Approve a waiting run's tool call",
        description="A run whose model called a tool that requires approval waits "
        "(`status` `waiting`, `waiting.reason` `approval`), holding no worker. Approving "
        "makes the call (with `arguments` when given, checked against the tool's "
        "parameters schema: a 400 otherwise, nothing changed) and the run goes on from "
        "that step on any worker: 202. 409 when it does not wait for an approval.",
        request=ApproveInputSerializer,
        responses={202: RunOutputSerializer, **_NOT_WAITING},
    )
    def post(self, request, project_id, run_id):
        run = project_run_get(project=self.project, run_id=run_id)
        data = ApproveInputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        try:
            resumed = run_approve(
                run=run,
                call_id=data.validated_data.get("call_id"),
                arguments=data.validated_data.get("arguments"),
            )
        except ApprovalRefused as exc:
            return _refused(exc)
        return Response(RunOutputSerializer(resumed).data, status=status.HTTP_202_ACCEPTED)


@extend_schema(tags=["Chat"])
class RunRejectApi(ProjectScopedApi):
    credential_scopes = {"POST": CHAT}

    @extend_schema(
        operation_id="runs_reject",
        summary="Reject a waiting run's tool call",
        description="The calls the run waits for are not made; the model is told "
        "`reason` as their result and the run goes on from that step on any worker: "
        "202. 409 when it does not wait for an approval.",
        request=RejectInputSerializer,
        responses={202: RunOutputSerializer, **_NOT_WAITING},
    )
    def post(self, request, project_id, run_id):
        run = project_run_get(project=self.project, run_id=run_id)
        data = RejectInputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        try:
            resumed = run_reject(run=run, reason=data.validated_data["reason"])
        except ApprovalRefused as exc:
            return _refused(exc)
        return Response(RunOutputSerializer(resumed).data, status=status.HTTP_202_ACCEPTED)
