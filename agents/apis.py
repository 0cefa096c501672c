import json

from django.conf import settings
from django.db import IntegrityError
from django.http import Http404
from drf_spectacular.utils import extend_schema, extend_schema_field
from rest_framework import serializers, status
from rest_framework.response import Response

from config.api import StrictSerializer, list_response, validate_text_size
from workspaces.mixins import WorkerSpaceMixin

from .selectors import (
    agent_get,
    agent_list,
    context_job_get,
    message_list,
    session_get,
    session_list,
)
from .services import (
    ContextUnavailable,
    agent_create,
    agent_delete,
    agent_update,
    context_clear,
    context_documents_add,
    context_search,
    message_create,
    session_create,
    session_delete,
    session_runs_cancel,
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


class MessageAcceptedSerializer(MessageOutputSerializer):
    assistant_message_id = serializers.IntegerField(
        help_text="The assistant message the agent is producing; follow it on …/events/."
    )


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


class SessionCancelApi(WorkerSpaceMixin):
    """Stop the session's in-flight answers: 202 when some were stopped, 200 when none ran."""

    @extend_schema(
        request=None, responses={200: CancelOutputSerializer, 202: CancelOutputSerializer}
    )
    def post(self, request, project_id, session_id):
        session = session_get(project=self.project, session_id=session_id)
        cancelled = session_runs_cancel(session=session)
        code = status.HTTP_202_ACCEPTED if cancelled else status.HTTP_200_OK
        return Response({"cancelled": cancelled}, status=code)


# --- Agent context (RAG memory) ------------------------------------------------------

MAX_CONTEXT_DOCUMENTS = 100
MAX_CONTEXT_TOTAL_BYTES = 1024 * 1024
MAX_METADATA_BYTES = 2 * 1024
MAX_QUERY_CHARS = 1000
MAX_SEARCH_K = 50


@extend_schema_field(
    {
        "oneOf": [
            {"type": "string"},
            {
                "type": "object",
                "properties": {"text": {"type": "string"}, "metadata": {"type": "object"}},
                "required": ["text"],
            },
        ]
    }
)
class ContextDocumentField(serializers.Field):
    """A document: a string, or {"text": "...", "metadata": {...}}."""

    default_error_messages = {
        "invalid": 'Must be a string or an object {{"text": "...", "metadata": {{...}}}}.',
        "blank": "Must not be blank.",
        "unknown": "Unknown keys: {keys}.",
        "metadata": f"metadata must be a JSON object of at most {MAX_METADATA_BYTES} bytes.",
    }

    def to_internal_value(self, data):
        if isinstance(data, str):
            data = {"text": data}
        if not isinstance(data, dict) or not isinstance(data.get("text"), str):
            self.fail("invalid")
        unknown = set(data) - {"text", "metadata"}
        if unknown:
            self.fail("unknown", keys=", ".join(sorted(unknown)))
        text = data["text"]
        if not text.strip():
            self.fail("blank")
        validate_text_size(text)
        metadata = data.get("metadata", {})
        if not isinstance(metadata, dict):
            self.fail("metadata")
        if len(json.dumps(metadata).encode()) > MAX_METADATA_BYTES:
            self.fail("metadata")
        return {"text": text, "metadata": metadata}

    def to_representation(self, value):
        return value


class ContextInputSerializer(StrictSerializer):
    documents = serializers.ListField(
        child=ContextDocumentField(), min_length=1, max_length=MAX_CONTEXT_DOCUMENTS
    )

    def validate(self, attrs):
        attrs = super().validate(attrs)
        total = sum(len(d["text"].encode()) for d in attrs["documents"])
        if total > MAX_CONTEXT_TOTAL_BYTES:
            raise serializers.ValidationError(
                {"documents": [f"Must total at most {MAX_CONTEXT_TOTAL_BYTES} bytes of text."]}
            )
        return attrs


class ContextSearchSerializer(StrictSerializer):
    q = serializers.CharField(max_length=MAX_QUERY_CHARS, trim_whitespace=True)
    k = serializers.IntegerField(min_value=1, max_value=MAX_SEARCH_K, default=5)


class ContextJobSerializer(serializers.Serializer):
    id = serializers.CharField()
    kind = serializers.CharField()
    agent_id = serializers.CharField()
    status = serializers.CharField(help_text="queued, running, done or error")
    documents = serializers.IntegerField(required=False)
    chunks = serializers.IntegerField(required=False)
    error = serializers.CharField(required=False)
    created_at = serializers.FloatField()
    finished_at = serializers.FloatField(required=False)


class ContextHitSerializer(serializers.Serializer):
    id = serializers.CharField()
    score = serializers.FloatField()
    text = serializers.CharField()
    kind = serializers.CharField()
    metadata = serializers.JSONField()


def _job_body(job_id: str) -> dict:
    return {"job_id": job_id, "status": "queued"}


class AgentContextApi(WorkerSpaceMixin):
    """The agent's context: add documents (202, a job), search (?q=&k=), clear (202, a job)."""

    @extend_schema(
        parameters=[ContextSearchSerializer],
        responses={200: ContextHitSerializer(many=True)},
    )
    def get(self, request, project_id, agent_id):
        agent = agent_get(project=self.project, agent_id=agent_id)
        query = ContextSearchSerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        try:
            hits = context_search(
                agent=agent,
                query=query.validated_data["q"],
                k=query.validated_data["k"],
                timeout=settings.CONTEXT_SEARCH_TIMEOUT_SECONDS,
            )
        except ContextUnavailable as exc:
            return Response({"detail": str(exc)}, status=status.HTTP_503_SERVICE_UNAVAILABLE)
        return Response({"results": ContextHitSerializer(hits, many=True).data})

    @extend_schema(request=ContextInputSerializer, responses={202: ContextJobSerializer})
    def post(self, request, project_id, agent_id):
        agent = agent_get(project=self.project, agent_id=agent_id)
        data = ContextInputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        job_id = context_documents_add(agent=agent, documents=data.validated_data["documents"])
        return Response(_job_body(job_id), status=status.HTTP_202_ACCEPTED)

    @extend_schema(request=None, responses={202: ContextJobSerializer})
    def delete(self, request, project_id, agent_id):
        agent = agent_get(project=self.project, agent_id=agent_id)
        job_id = context_clear(agent=agent)
        return Response(_job_body(job_id), status=status.HTTP_202_ACCEPTED)


class AgentContextJobApi(WorkerSpaceMixin):
    @extend_schema(responses=ContextJobSerializer)
    def get(self, request, project_id, agent_id, job_id):
        agent = agent_get(project=self.project, agent_id=agent_id)
        job = context_job_get(agent=agent, job_id=job_id)
        if job is None:
            raise Http404("No such context job.")
        return Response(ContextJobSerializer(job).data)
