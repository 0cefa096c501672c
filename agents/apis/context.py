"""An agent's context (RAG memory): add documents, search, clear, and the jobs' status."""

import json

from django.conf import settings
from django.http import Http404
from drf_spectacular.utils import extend_schema, extend_schema_field
from rest_framework import serializers, status
from rest_framework.response import Response

from common.api import StrictSerializer
from common.validators import validate_text_size
from projects.mixins import ProjectScopedApi

from ..selectors import agent_get, context_job_get
from ..services import ContextUnavailable, context_clear, context_documents_add, context_search

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


class AgentContextApi(ProjectScopedApi):
    """The agent's context: add documents (202, a job), search (?q=&k=), clear (202, a job)."""

    throttle_scopes = {"GET": "searches", "POST": "ingests"}

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


class AgentContextJobApi(ProjectScopedApi):
    @extend_schema(responses=ContextJobSerializer)
    def get(self, request, project_id, agent_id, job_id):
        agent = agent_get(project=self.project, agent_id=agent_id)
        job = context_job_get(agent=agent, job_id=job_id)
        if job is None:
            raise Http404("No such context job.")
        return Response(ContextJobSerializer(job).data)
