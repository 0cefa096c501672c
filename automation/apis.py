"""Schedules and webhooks of a project."""

from __future__ import annotations

from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers, status
from rest_framework.response import Response

from agents.selectors import agent_list
from chat.selectors import session_list
from common.api import (
    EnvelopeListMixin,
    EnvelopePagination,
    FieldNotFound,
    StrictSerializer,
    TextField,
    UUIDField,
)
from common.validators import MAX_TEXT_BYTES, validate_text_size
from projects.idempotency import idempotent
from projects.mixins import ProjectScopedApi

from .models import Schedule, ScheduleFire, WebhookDelivery
from .schedules import ScheduleInvalid, schedule_create, schedule_delete, schedule_update
from .selectors import (
    delivery_get,
    delivery_list,
    schedule_fire_list,
    schedule_get,
    schedule_list,
    webhook_get,
    webhook_list,
)
from .webhooks import (
    DELIVERY_ID_PATTERN,
    EVENT_TYPES,
    WebhookUrlRefused,
    delivery_replay,
    webhook_create,
    webhook_delete,
    webhook_secret_rotate,
    webhook_update,
)

# --- Schedules ------------------------------------------------------------------------


class ScheduleOutputSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    project_id = serializers.UUIDField()
    agent_id = serializers.UUIDField()
    session_id = serializers.UUIDField(help_text="The chat session its messages go into.")
    name = serializers.CharField()
    content = serializers.CharField(help_text="The message sent at each firing.")
    kind = serializers.ChoiceField(choices=Schedule.Kind.choices)
    run_at = serializers.DateTimeField(allow_null=True)
    cron = serializers.CharField()
    timezone = serializers.CharField()
    enabled = serializers.BooleanField()
    created_at = serializers.DateTimeField()

    class Meta:
        ref_name = "Schedule"


class ScheduleInputSerializer(StrictSerializer):
    agent_id = UUIDField(help_text="The agent of this project the messages go to.")
    session_id = UUIDField(
        required=False,
        help_text="A session of that agent to post into; without it, one is made.",
    )
    name = TextField(max_length=200)
    content = TextField(
        max_length=MAX_TEXT_BYTES,
        validators=[validate_text_size],
        help_text=f"The message; at most {MAX_TEXT_BYTES} bytes in UTF-8.",
    )
    kind = serializers.ChoiceField(choices=Schedule.Kind.choices)
    run_at = serializers.DateTimeField(
        required=False, help_text="`once`: when (in the future), with its UTC offset."
    )
    cron = TextField(
        max_length=120,
        required=False,
        help_text="`cron`: five fields, minute hour day-of-month month day-of-week, "
        "e.g. `0 9 * * 1-5`.",
    )
    timezone = TextField(
        max_length=64,
        required=False,
        default="UTC",
        help_text="The IANA time zone `cron` is read in, e.g. `Europe/Berlin`.",
    )
    enabled = serializers.BooleanField(required=False, default=True)

    class Meta:
        ref_name = "ScheduleInput"


class ScheduleUpdateSerializer(StrictSerializer):
    name = TextField(max_length=200, required=False)
    content = TextField(max_length=MAX_TEXT_BYTES, validators=[validate_text_size], required=False)
    run_at = serializers.DateTimeField(required=False)
    cron = TextField(max_length=120, required=False)
    timezone = TextField(max_length=64, required=False)
    enabled = serializers.BooleanField(required=False)

    class Meta:
        ref_name = "ScheduleUpdate"


class ScheduleFireSerializer(serializers.Serializer):
    tick = serializers.DateTimeField(
        help_text="The tick this firing answers: `run_at`, or the cron's latest tick when it fired."
    )
    fired_at = serializers.DateTimeField()
    outcome = serializers.ChoiceField(choices=ScheduleFire.Outcome.choices)
    detail = serializers.CharField(help_text="Why it was refused; empty otherwise.")
    message_id = serializers.IntegerField(
        allow_null=True, help_text="The assistant message answering it."
    )

    class Meta:
        ref_name = "ScheduleFire"


def _invalid(exc: ScheduleInvalid) -> serializers.ValidationError:
    return serializers.ValidationError({exc.field: [str(exc)]})


@extend_schema(tags=["Schedules"])
class ScheduleListCreateApi(EnvelopeListMixin, ProjectScopedApi):
    pagination_class = EnvelopePagination.of("schedules")

    @extend_schema(
        operation_id="schedules_list",
        summary="List a project's schedules",
        description="Newest first.",
        responses={200: ScheduleOutputSerializer(many=True)},
    )
    def get(self, request, project_id):
        return self.list_response(schedule_list(project=self.project), ScheduleOutputSerializer)

    @extend_schema(
        operation_id="schedules_create",
        summary="Schedule a message to an agent",
        description="`once` sends `content` at `run_at`; `cron` on every tick of `cron` "
        "in `timezone`. Each firing goes into the session as a user's message would "
        "(quotas, the agent's busy policy, the project's bus); a tick missed while the "
        "scheduler was down fires once when it is back, never once per missed tick, and "
        "a firing lost with its worker, or failed, is fired again a minute or two later. "
        "A `cron` that does not parse, a `timezone` that is no IANA name, a missing or "
        "past `run_at` for `once` are a 400 naming the field.",
        request=ScheduleInputSerializer,
        responses={201: ScheduleOutputSerializer},
    )
    @idempotent
    def post(self, request, project_id):
        data = ScheduleInputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        v = data.validated_data
        agent = agent_list(project=self.project).filter(id=v["agent_id"]).first()
        if agent is None:
            raise FieldNotFound({"agent_id": ["No such agent in this project."]})
        session = None
        if "session_id" in v:
            session = (
                session_list(project=self.project)
                .filter(id=v["session_id"], agent_id=agent.id)
                .first()
            )
            if session is None:
                raise FieldNotFound({"session_id": ["No such session of this agent."]})
        try:
            schedule = schedule_create(
                project=self.project,
                agent=agent,
                session=session,
                name=v["name"],
                content=v["content"],
                kind=v["kind"],
                run_at=v.get("run_at"),
                cron=v.get("cron", ""),
                timezone_name=v["timezone"],
                enabled=v["enabled"],
            )
        except ScheduleInvalid as exc:
            raise _invalid(exc) from None
        return Response(ScheduleOutputSerializer(schedule).data, status=status.HTTP_201_CREATED)


@extend_schema(tags=["Schedules"])
class ScheduleDetailApi(ProjectScopedApi):
    @extend_schema(
        operation_id="schedules_retrieve",
        summary="Get a schedule",
        responses={200: ScheduleOutputSerializer},
    )
    def get(self, request, project_id, schedule_id):
        schedule = schedule_get(project=self.project, schedule_id=schedule_id)
        return Response(ScheduleOutputSerializer(schedule).data)

    @extend_schema(
        operation_id="schedules_update",
        summary="Change a schedule",
        description="Changes only the fields given (`kind` stays); the scheduler follows "
        "within seconds. Timing that cannot be used is a 400 naming the field.",
        request=ScheduleUpdateSerializer,
        responses={200: ScheduleOutputSerializer},
    )
    def patch(self, request, project_id, schedule_id):
        schedule = schedule_get(project=self.project, schedule_id=schedule_id)
        data = ScheduleUpdateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        try:
            schedule = schedule_update(schedule=schedule, data=data.validated_data)
        except ScheduleInvalid as exc:
            raise _invalid(exc) from None
        return Response(ScheduleOutputSerializer(schedule).data)

    @extend_schema(
        operation_id="schedules_destroy",
        summary="Delete a schedule",
        description="It fires no more; its session and messages stay.",
        responses={204: None},
    )
    def delete(self, request, project_id, schedule_id):
        schedule_delete(schedule=schedule_get(project=self.project, schedule_id=schedule_id))
        return Response(status=status.HTTP_204_NO_CONTENT)


@extend_schema(tags=["Schedules"])
class ScheduleFireListApi(EnvelopeListMixin, ProjectScopedApi):
    pagination_class = EnvelopePagination.of("fires")

    @extend_schema(
        operation_id="schedules_fires",
        summary="List a schedule's firings",
        description="Newest tick first: what each sent, or why it was refused.",
        responses={200: ScheduleFireSerializer(many=True)},
    )
    def get(self, request, project_id, schedule_id):
        schedule = schedule_get(project=self.project, schedule_id=schedule_id)
        return self.list_response(schedule_fire_list(schedule=schedule), ScheduleFireSerializer)


# --- Webhooks -------------------------------------------------------------------------


class WebhookOutputSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    url = serializers.URLField()
    events = serializers.ListField(child=serializers.ChoiceField(choices=EVENT_TYPES))
    description = serializers.CharField()
    enabled = serializers.BooleanField()
    consecutive_failures = serializers.IntegerField(
        help_text="Failed attempts in a row; its deliveries wait out its backoff."
    )
    blocked_until = serializers.DateTimeField(
        allow_null=True, help_text="Until when its deliveries wait (backoff)."
    )
    created_at = serializers.DateTimeField()

    class Meta:
        ref_name = "Webhook"


class WebhookCreatedSerializer(WebhookOutputSerializer):
    secret = serializers.CharField(
        help_text="`whsec_…`: verifies `webhook-signature` (Standard Webhooks). Shown only now."
    )

    class Meta:
        ref_name = "WebhookCreated"


class WebhookInputSerializer(StrictSerializer):
    url = serializers.URLField(
        max_length=2000, help_text="http(s); reached through the egress guard."
    )
    events = serializers.ListField(
        child=serializers.ChoiceField(choices=EVENT_TYPES), min_length=1, max_length=4
    )
    description = TextField(max_length=200, allow_blank=True, required=False)
    enabled = serializers.BooleanField(required=False)

    class Meta:
        ref_name = "WebhookInput"


class WebhookAttemptSerializer(serializers.Serializer):
    number = serializers.IntegerField()
    at = serializers.DateTimeField()
    status_code = serializers.IntegerField(allow_null=True)
    error = serializers.CharField()
    duration_ms = serializers.IntegerField()

    class Meta:
        ref_name = "WebhookAttempt"


class WebhookDeliverySerializer(serializers.Serializer):
    id = serializers.CharField(help_text="The `webhook-id` header: the same on every attempt.")
    event_type = serializers.ChoiceField(choices=EVENT_TYPES)
    body = serializers.CharField(help_text="The exact JSON body signed and sent.")
    status = serializers.ChoiceField(choices=WebhookDelivery.Status.choices)
    attempts = serializers.IntegerField()
    next_attempt_at = serializers.DateTimeField(allow_null=True)
    created_at = serializers.DateTimeField()
    delivered_at = serializers.DateTimeField(allow_null=True)
    log = WebhookAttemptSerializer(many=True)

    class Meta:
        ref_name = "WebhookDelivery"


def _url_refused(exc: WebhookUrlRefused) -> serializers.ValidationError:
    return serializers.ValidationError({"url": [str(exc)]})


@extend_schema(tags=["Webhooks"])
class WebhookListCreateApi(EnvelopeListMixin, ProjectScopedApi):
    pagination_class = EnvelopePagination.of("webhooks")

    @extend_schema(
        operation_id="webhooks_list",
        summary="List a project's webhook endpoints",
        responses={200: WebhookOutputSerializer(many=True)},
    )
    def get(self, request, project_id):
        return self.list_response(webhook_list(project=self.project), WebhookOutputSerializer)

    @extend_schema(
        operation_id="webhooks_create",
        summary="Add a webhook endpoint",
        description="The project's runs' events (`run.completed`, `run.failed`, "
        "`run.cancelled`, `run.waiting`) are POSTed to `url`, signed per Standard "
        "Webhooks (`webhook-id`, `webhook-timestamp`, `webhook-signature`) with the "
        "`secret` answered here once; retried with backoff for a day. A `url` whose "
        "host does not resolve, or resolves to an address the egress guard refuses "
        "(private, loopback, ...), is a 400.",
        request=WebhookInputSerializer,
        responses={201: WebhookCreatedSerializer},
    )
    def post(self, request, project_id):
        data = WebhookInputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        v = data.validated_data
        try:
            endpoint = webhook_create(
                project=self.project,
                url=v["url"],
                events=v["events"],
                description=v.get("description", ""),
            )
        except WebhookUrlRefused as exc:
            raise _url_refused(exc) from None
        if v.get("enabled") is False:
            endpoint = webhook_update(endpoint=endpoint, data={"enabled": False})
        return Response(WebhookCreatedSerializer(endpoint).data, status=status.HTTP_201_CREATED)


@extend_schema(tags=["Webhooks"])
class WebhookDetailApi(ProjectScopedApi):
    @extend_schema(
        operation_id="webhooks_retrieve",
        summary="Get a webhook endpoint",
        responses={200: WebhookOutputSerializer},
    )
    def get(self, request, project_id, webhook_id):
        endpoint = webhook_get(project=self.project, webhook_id=webhook_id)
        return Response(WebhookOutputSerializer(endpoint).data)

    @extend_schema(
        operation_id="webhooks_update",
        summary="Change a webhook endpoint",
        description="Changes only the fields given; `enabled: true` also lifts its "
        "backoff. A `url` the egress guard refuses is a 400.",
        request=WebhookInputSerializer,
        responses={200: WebhookOutputSerializer},
    )
    def patch(self, request, project_id, webhook_id):
        endpoint = webhook_get(project=self.project, webhook_id=webhook_id)
        data = WebhookInputSerializer(data=request.data, partial=True)
        data.is_valid(raise_exception=True)
        try:
            endpoint = webhook_update(endpoint=endpoint, data=data.validated_data)
        except WebhookUrlRefused as exc:
            raise _url_refused(exc) from None
        return Response(WebhookOutputSerializer(endpoint).data)

    @extend_schema(
        operation_id="webhooks_destroy",
        summary="Delete a webhook endpoint",
        description="With its delivery log; nothing more is sent to it.",
        responses={204: None},
    )
    def delete(self, request, project_id, webhook_id):
        webhook_delete(endpoint=webhook_get(project=self.project, webhook_id=webhook_id))
        return Response(status=status.HTTP_204_NO_CONTENT)


@extend_schema(tags=["Webhooks"])
class WebhookSecretRotateApi(ProjectScopedApi):
    @extend_schema(
        operation_id="webhooks_rotate_secret",
        summary="Give a webhook endpoint a new secret",
        description="Answers the new secret, once; later attempts are signed with it.",
        request=None,
        responses={200: WebhookCreatedSerializer},
    )
    def post(self, request, project_id, webhook_id):
        endpoint = webhook_get(project=self.project, webhook_id=webhook_id)
        endpoint = webhook_secret_rotate(endpoint=endpoint)
        return Response(WebhookCreatedSerializer(endpoint).data)


@extend_schema(tags=["Webhooks"])
class DeliveryListApi(EnvelopeListMixin, ProjectScopedApi):
    pagination_class = EnvelopePagination.of("deliveries")

    @extend_schema(
        operation_id="webhooks_deliveries",
        summary="A webhook endpoint's delivery log",
        description="Newest first, each with its attempts (status code, error, time).",
        responses={200: WebhookDeliverySerializer(many=True)},
    )
    def get(self, request, project_id, webhook_id):
        endpoint = webhook_get(project=self.project, webhook_id=webhook_id)
        return self.list_response(delivery_list(endpoint=endpoint), WebhookDeliverySerializer)


@extend_schema(
    tags=["Webhooks"],
    parameters=[
        OpenApiParameter(
            "delivery_id",
            str,
            OpenApiParameter.PATH,
            pattern=DELIVERY_ID_PATTERN,
            description="The delivery's id, its `webhook-id` header (`msg_` and 32 hex "
            "digits, as the delivery log lists it).",
        )
    ],
)
class DeliveryReplayApi(ProjectScopedApi):
    @extend_schema(
        operation_id="webhooks_delivery_replay",
        summary="Send a delivery again",
        description="Queues another attempt now, with the same `webhook-id` and body "
        "(whatever its status); the endpoint's backoff is lifted.",
        request=None,
        responses={202: WebhookDeliverySerializer},
    )
    def post(self, request, project_id, webhook_id, delivery_id):
        endpoint = webhook_get(project=self.project, webhook_id=webhook_id)
        delivery = delivery_get(endpoint=endpoint, delivery_id=delivery_id)
        delivery = delivery_replay(delivery=delivery)
        return Response(WebhookDeliverySerializer(delivery).data, status=status.HTTP_202_ACCEPTED)
