"""An agent's tools (built-in or HTTP) and the project's secrets HTTP tools use."""

from __future__ import annotations

from django.conf import settings
from django.core.exceptions import ValidationError as DjangoValidationError
from django.core.validators import RegexValidator
from django.db import IntegrityError
from drf_spectacular.utils import OpenApiParameter, extend_schema, extend_schema_field
from rest_framework import serializers, status
from rest_framework.response import Response

from common.api import (
    Conflict,
    EnvelopeListMixin,
    EnvelopePagination,
    FieldNotFound,
    StrictSerializer,
    TextField,
    UUIDField,
)
from common.schema import error_responses
from common.validators import MAX_TEXT_BYTES, validate_text_size
from projects.mixins import ProjectScopedApi

from ..models import Tool
from ..selectors import agent_get, agent_list, secret_get, secret_list, tool_get, tool_list
from ..services import (
    project_secret_delete,
    project_secret_set,
    tool_create,
    tool_delete,
    tool_update,
)
from ..tool_validation import (
    AGENT_TOOL_PARAMETERS,
    BUILTIN_SPECS,
    BUILTIN_TOOLS,
    MAX_HEADERS,
    MAX_SCHEMA_BYTES,
    SECRET_NAME,
    TOOL_NAME,
    validate_header_templates,
    validate_parameters_schema,
    validate_secret_name,
    validate_tool,
    validate_tool_name,
    validate_url_template,
)

MAX_TIMEOUT_SECONDS = 120.0


class StrictBooleanField(serializers.BooleanField):
    """A JSON boolean, as the schema says (DRF would also take "yes", 1, "true")."""

    def to_internal_value(self, data):
        if not isinstance(data, bool):
            self.fail("invalid", input=data)
        return data


class StrictFloatField(serializers.FloatField):
    """A JSON number, as the schema says (DRF would also take "1.5")."""

    default_error_messages = {"invalid": "A number is required."}

    def to_internal_value(self, data):
        if isinstance(data, bool) or not isinstance(data, int | float):
            self.fail("invalid")
        return super().to_internal_value(data)


@extend_schema_field(
    {
        "type": "object",
        "description": "A JSON Schema (draft 2020-12) of the arguments object, as in "
        "OpenAI function calling. Ignored for built-in tools (theirs is fixed). At most "
        f"{MAX_SCHEMA_BYTES} bytes as JSON.",
        "additionalProperties": True,
    }
)
class ParametersField(serializers.JSONField):
    pass


@extend_schema_field(
    {
        "type": "object",
        "description": f"At most {MAX_HEADERS} request headers of an HTTP tool. A value "
        "may hold `{{secret:NAME}}`, replaced by the project's secret NAME when the tool "
        "is called; the secret itself is never shown.",
        "additionalProperties": {"type": "string", "maxLength": 4096},
        "maxProperties": MAX_HEADERS,
    }
)
class HeadersField(serializers.JSONField):
    pass


class NameField(TextField):
    """A name as the schema states it: `pattern` is the field's regex (the schema shows
    the first RegexValidator: this one, not TextField's own "not blank")."""

    def __init__(self, *, pattern, **kwargs):
        super().__init__(**kwargs)
        self.validators.insert(0, RegexValidator(pattern.pattern, "Not a valid name."))


class ToolOutputSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    agent_id = serializers.UUIDField()
    kind = serializers.ChoiceField(choices=Tool.Kind.choices)
    name = serializers.CharField()
    description = serializers.CharField()
    parameters = ParametersField()
    method = serializers.CharField(help_text="HTTP tools: the request's method.")
    url_template = serializers.CharField()
    headers = HeadersField()
    safe_to_repeat = serializers.BooleanField()
    requires_approval = serializers.BooleanField(
        help_text="A call waits for the owner's approval (the run holds no worker "
        "meanwhile). True also when the deployment's TOOL_APPROVAL_KINDS names its kind."
    )
    timeout_seconds = serializers.FloatField(allow_null=True)
    target_agent_id = serializers.UUIDField(allow_null=True, help_text="Agent tools.")
    created_at = serializers.DateTimeField()
    updated_at = serializers.DateTimeField()

    class Meta:
        ref_name = "Tool"

    def to_representation(self, tool: Tool) -> dict:
        data = super().to_representation(tool)
        builtin = BUILTIN_SPECS.get(tool.name) if tool.kind == Tool.Kind.BUILTIN else None
        if builtin is not None:  # what the model is told
            data["parameters"] = builtin["parameters"]
            data["description"] = tool.description or builtin["description"]
            data["safe_to_repeat"] = builtin["safe_to_repeat"]
        if tool.kind == Tool.Kind.AGENT:
            data["parameters"] = AGENT_TOOL_PARAMETERS
        data["requires_approval"] = tool.requires_approval or (
            tool.kind in settings.TOOL_APPROVAL_KINDS
        )
        return data


class ToolInputSerializer(StrictSerializer):
    kind = serializers.ChoiceField(
        choices=Tool.Kind.choices,
        help_text="`builtin`: one of the agent's own abilities, named by `name` "
        f"({', '.join(BUILTIN_TOOLS)}). `http`: a call to an HTTP endpoint. `agent`: "
        "asks another agent of the project (`target_agent_id`) over the project's bus.",
    )
    name = NameField(
        pattern=TOOL_NAME,
        max_length=64,
        validators=[validate_tool_name],
        help_text="The function name the model calls: letters, digits, '_' or '-'; unique "
        "per agent.",
    )
    description = TextField(
        allow_blank=True,
        required=False,
        max_length=MAX_TEXT_BYTES,
        validators=[validate_text_size],
        help_text="What the tool does, for the model.",
    )
    parameters = ParametersField(required=False, validators=[validate_parameters_schema])
    method = serializers.ChoiceField(
        choices=Tool.Method.choices, required=False, help_text="HTTP tools."
    )
    url_template = TextField(
        max_length=2000,
        required=False,
        validators=[validate_url_template],
        help_text="HTTP tools: an absolute http(s) URL; `{name}` places a parameter in "
        "its path or query (percent-encoded). Other arguments go to the query string "
        "(GET, DELETE) or the JSON body.",
    )
    headers = HeadersField(required=False, validators=[validate_header_templates])
    safe_to_repeat = StrictBooleanField(
        required=False,
        help_text="HTTP tools: may a call be made again if the worker running it dies "
        "mid-call? If not, such a run ends in error saying so instead of starting over.",
    )
    requires_approval = StrictBooleanField(
        required=False,
        help_text="Each call waits for the owner's approval: the run is stored (status "
        "`waiting`, event `run.waiting`), holding no worker, until POST "
        "/my/projects/{id}/runs/{run_id}/approve/ (arguments may be edited) or "
        "/reject/ (with a reason). Default false.",
    )
    timeout_seconds = StrictFloatField(
        required=False,
        allow_null=True,
        min_value=0.1,
        max_value=MAX_TIMEOUT_SECONDS,
        help_text="HTTP tools: the whole call's time limit; null: TOOL_TIMEOUT_SECONDS.",
    )
    target_agent_id = UUIDField(
        required=False,
        allow_null=True,
        help_text="Agent tools: the agent of this project it asks (not the tool's own).",
    )

    class Meta:
        ref_name = "ToolInput"


def tool_fields(project, agent, data: dict, current: dict | None = None) -> dict:
    """The tool's fields from validated input (`target_agent_id` resolved to an agent of
    the project), checked as a whole, merged over `current` for a partial update."""
    data = dict(data)
    if "target_agent_id" in data:
        target_id = data.pop("target_agent_id")
        target = None
        if target_id is not None:
            target = agent_list(project=project).filter(id=target_id).first()
            if target is None:
                raise FieldNotFound({"target_agent_id": ["No such agent in this project."]})
        data["target_agent"] = target
    try:
        validate_tool({**(current or {}), **data, "agent": agent})
    except DjangoValidationError as exc:
        raise serializers.ValidationError(exc.message_dict) from None
    return data


def _name_taken() -> Conflict:
    return Conflict({"name": ["The agent has a tool with this name."]})


_TOOL_CONFLICT = error_responses(409, _409="The agent has a tool with this name.")


@extend_schema(tags=["Tools"])
class ToolListCreateApi(EnvelopeListMixin, ProjectScopedApi):
    pagination_class = EnvelopePagination.of("tools")

    @extend_schema(
        operation_id="tools_list",
        summary="List an agent's tools",
        description="Oldest first.",
        responses={200: ToolOutputSerializer(many=True)},
    )
    def get(self, request, project_id, agent_id):
        agent = agent_get(project=self.project, agent_id=agent_id)
        return self.list_response(tool_list(agent=agent), ToolOutputSerializer)

    @extend_schema(
        operation_id="tools_create",
        summary="Give an agent a tool",
        description="The agent's next answers may call it. A built-in tool needs only "
        "`kind` and `name`; an HTTP tool needs `method` and `url_template`, and every "
        "placeholder of the URL must be a property of `parameters`; an agent tool needs "
        "`target_agent_id`; an MCP tool needs `url_template` (its server's endpoint, no "
        "placeholders) and a `name` of at most 20 characters (the prefix of its tools). "
        "A tool that breaks one of these rules is a 400 naming the field.",
        request=ToolInputSerializer,
        responses={
            201: ToolOutputSerializer,
            **_TOOL_CONFLICT,
            **error_responses(
                404,
                _404="No such project or agent, or `target_agent_id` names no agent "
                "of this project.",
            ),
        },
    )
    def post(self, request, project_id, agent_id):
        agent = agent_get(project=self.project, agent_id=agent_id)
        data = ToolInputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        fields = tool_fields(self.project, agent, data.validated_data)
        if tool_list(agent=agent).filter(name=fields["name"]).exists():
            raise _name_taken()
        try:
            tool = tool_create(agent=agent, data=fields)
        except IntegrityError:
            raise _name_taken() from None
        return Response(ToolOutputSerializer(tool).data, status=status.HTTP_201_CREATED)


@extend_schema(tags=["Tools"])
class ToolDetailApi(ProjectScopedApi):
    def _tool(self, agent_id, tool_id) -> Tool:
        agent = agent_get(project=self.project, agent_id=agent_id)
        return tool_get(agent=agent, tool_id=tool_id)

    @extend_schema(
        operation_id="tools_retrieve",
        summary="Get a tool",
        responses={200: ToolOutputSerializer},
    )
    def get(self, request, project_id, agent_id, tool_id):
        return Response(ToolOutputSerializer(self._tool(agent_id, tool_id)).data)

    @extend_schema(
        operation_id="tools_update",
        summary="Change a tool",
        description="Changes only the fields given; the tool as a whole must stay valid "
        "(the rules of tools_create, a 400 naming the field otherwise).",
        request=ToolInputSerializer,
        responses={200: ToolOutputSerializer, **_TOOL_CONFLICT},
    )
    def patch(self, request, project_id, agent_id, tool_id):
        tool = self._tool(agent_id, tool_id)
        data = ToolInputSerializer(data=request.data, partial=True)
        data.is_valid(raise_exception=True)
        merged = ("kind", "name", "parameters", "method", "url_template", "headers")
        current = {f: getattr(tool, f) for f in merged}
        current["target_agent"] = tool.target_agent
        fields = tool_fields(self.project, tool.agent, data.validated_data, current)
        name = fields.get("name")
        if name and tool_list(agent=tool.agent).filter(name=name).exclude(id=tool.id).exists():
            raise _name_taken()
        try:
            tool = tool_update(tool=tool, data=fields)
        except IntegrityError:
            raise _name_taken() from None
        return Response(ToolOutputSerializer(tool).data)

    @extend_schema(
        operation_id="tools_destroy",
        summary="Take a tool away from an agent",
        responses={204: None},
    )
    def delete(self, request, project_id, agent_id, tool_id):
        tool_delete(tool=self._tool(agent_id, tool_id))
        return Response(status=status.HTTP_204_NO_CONTENT)


# --- Secrets ---------------------------------------------------------------------------


class SecretOutputSerializer(serializers.Serializer):
    name = serializers.CharField()
    created_at = serializers.DateTimeField()
    updated_at = serializers.DateTimeField()

    class Meta:
        ref_name = "Secret"


SECRET_VALUE_HELP = (
    "Write-only: never returned by any endpoint, and scrubbed from tools' results and "
    "events. At most 4096 characters."
)


class SecretInputSerializer(StrictSerializer):
    name = NameField(
        pattern=SECRET_NAME,
        max_length=64,
        validators=[validate_secret_name],
        help_text="Letters, digits and '_', not starting with a digit. Header values of "
        "HTTP tools name it as `{{secret:NAME}}`.",
    )
    value = TextField(max_length=4096, help_text=SECRET_VALUE_HELP)

    class Meta:
        ref_name = "SecretInput"


class SecretValueSerializer(StrictSerializer):
    value = TextField(max_length=4096, help_text=SECRET_VALUE_HELP)

    class Meta:
        ref_name = "SecretValue"


@extend_schema(tags=["Tools"])
class SecretListCreateApi(EnvelopeListMixin, ProjectScopedApi):
    pagination_class = EnvelopePagination.of("secrets")

    @extend_schema(
        operation_id="secrets_list",
        summary="List a project's secrets (names only)",
        responses={200: SecretOutputSerializer(many=True)},
    )
    def get(self, request, project_id):
        return self.list_response(secret_list(project=self.project), SecretOutputSerializer)

    @extend_schema(
        operation_id="secrets_create",
        summary="Store a secret for the project's HTTP tools",
        description="The value is write-only: the answer holds only the name.",
        request=SecretInputSerializer,
        responses={
            201: SecretOutputSerializer,
            **error_responses(409, _409="The project has a secret with this name."),
        },
    )
    def post(self, request, project_id):
        data = SecretInputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        name = data.validated_data["name"]
        if secret_list(project=self.project).filter(name=name).exists():
            raise Conflict({"name": ["The project has a secret with this name."]})
        try:
            secret = project_secret_set(
                project=self.project, name=name, value=data.validated_data["value"], create=True
            )
        except IntegrityError:
            raise Conflict({"name": ["The project has a secret with this name."]}) from None
        return Response(SecretOutputSerializer(secret).data, status=status.HTTP_201_CREATED)


def _check_secret_name(name: str) -> None:
    """A name in the path that no secret can have is the caller's error (400), before
    it reaches a query."""
    try:
        validate_secret_name(name)
    except DjangoValidationError as exc:
        raise serializers.ValidationError({"name": exc.messages}) from None


@extend_schema(
    tags=["Tools"],
    parameters=[
        OpenApiParameter(
            "name",
            str,
            OpenApiParameter.PATH,
            pattern=SECRET_NAME.pattern,
            description="The secret's name; one no secret can have is a 400.",
        )
    ],
)
class SecretDetailApi(ProjectScopedApi):
    @extend_schema(
        operation_id="secrets_update",
        summary="Replace a secret's value",
        request=SecretValueSerializer,
        responses={200: SecretOutputSerializer},
    )
    def put(self, request, project_id, name):
        _check_secret_name(name)
        secret = secret_get(project=self.project, name=name)
        data = SecretValueSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        secret = project_secret_set(
            project=self.project, name=secret.name, value=data.validated_data["value"]
        )
        return Response(SecretOutputSerializer(secret).data)

    @extend_schema(
        operation_id="secrets_destroy",
        summary="Delete a secret",
        description="Tools whose headers name it fail their calls until it is set again.",
        responses={
            204: None,
            **error_responses(400, _400="The name in the path is not a secret name."),
        },
    )
    def delete(self, request, project_id, name):
        _check_secret_name(name)
        project_secret_delete(secret=secret_get(project=self.project, name=name))
        return Response(status=status.HTTP_204_NO_CONTENT)
