"""An agent's context (RAG memory): add documents, search, clear, and the jobs' status."""

import json
import re

from django.http import Http404
from drf_spectacular.utils import extend_schema, extend_schema_field
from rest_framework import exceptions, serializers, status
from rest_framework.response import Response

from agents.selectors import agent_get
from common.api import NOT_BLANK, StrictSerializer, TextField
from common.schema import error_responses
from common.validators import MAX_TEXT_BYTES, validate_text_size
from projects.mixins import ProjectScopedApi

from .selectors import context_job_get
from .services import context_clear_enqueue, context_documents_add
from .sparse import SEARCH_MODES

MAX_CONTEXT_DOCUMENTS = 100
MAX_CONTEXT_TOTAL_BYTES = 1024 * 1024
MAX_METADATA_BYTES = 2 * 1024
MAX_QUERY_CHARS = 1000
MAX_SEARCH_K = 50


_TEXT = {
    "type": "string",
    "minLength": 1,
    "maxLength": MAX_TEXT_BYTES,
    "pattern": NOT_BLANK,
    "description": f"Not blank; at most {MAX_TEXT_BYTES} bytes in UTF-8.",
}


@extend_schema_field(
    {
        "oneOf": [
            _TEXT,
            {
                "type": "object",
                "properties": {
                    "text": _TEXT,
                    "metadata": {
                        "type": "object",
                        "additionalProperties": True,
                        "description": f"Kept with the text; at most {MAX_METADATA_BYTES} "
                        "bytes as JSON.",
                    },
                },
                "required": ["text"],
                "additionalProperties": False,
            },
        ],
        "description": 'A document: its text, or {"text": ..., "metadata": {...}}.',
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
        if not re.search(NOT_BLANK, text):
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
        child=ContextDocumentField(),
        min_length=1,
        max_length=MAX_CONTEXT_DOCUMENTS,
        help_text=f"At most {MAX_CONTEXT_TOTAL_BYTES} bytes of text in all.",
    )

    class Meta:
        ref_name = "ContextInput"

    def validate(self, attrs):
        attrs = super().validate(attrs)
        total = sum(len(d["text"].encode()) for d in attrs["documents"])
        if total > MAX_CONTEXT_TOTAL_BYTES:
            raise serializers.ValidationError(
                {"documents": [f"Must total at most {MAX_CONTEXT_TOTAL_BYTES} bytes of text."]}
            )
        return attrs


class ContextSearchSerializer(StrictSerializer):
    q = TextField(max_length=MAX_QUERY_CHARS, help_text="What to look for.")
    k = serializers.IntegerField(
        min_value=1, max_value=MAX_SEARCH_K, default=5, help_text="How many hits at most."
    )
    mode = serializers.ChoiceField(
        choices=SEARCH_MODES,
        required=False,
        help_text="dense (embeddings), sparse (BM25-like terms: exact identifiers, codes, "
        "numbers) or hybrid (both, fused by reciprocal rank). Default: the agent's "
        "params.search_mode, else the deployment's CONTEXT_SEARCH_MODE.",
    )


JOB_STATUSES = ("queued", "running", "done", "error")


class ContextJobSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    kind = serializers.ChoiceField(
        choices=("add", "clear"), help_text="add: store documents; clear: forget everything."
    )
    agent_id = serializers.UUIDField()
    status = serializers.ChoiceField(choices=JOB_STATUSES)
    documents = serializers.IntegerField(required=False, help_text="add: documents to store.")
    stored_documents = serializers.IntegerField(
        required=False, help_text="add: documents stored so far."
    )
    chunks = serializers.IntegerField(required=False, help_text="add: chunks stored so far.")
    error = serializers.CharField(required=False, help_text="Why the job ended in error.")
    created_at = serializers.FloatField(help_text="Unix time.")
    finished_at = serializers.FloatField(required=False, help_text="Unix time.")

    class Meta:
        ref_name = "ContextJob"


class ContextJobAcceptedSerializer(serializers.Serializer):
    job_id = serializers.UUIDField(help_text="Follow it at …/context/jobs/{job_id}/.")
    status = serializers.ChoiceField(choices=JOB_STATUSES)

    class Meta:
        ref_name = "ContextJobAccepted"


class ContextHitSerializer(serializers.Serializer):
    id = serializers.CharField()
    score = serializers.FloatField(
        help_text="Higher is closer: cosine similarity (dense), BM25 (sparse) or the fused "
        "reciprocal-rank score (hybrid)."
    )
    text = serializers.CharField()
    kind = serializers.CharField(help_text="document, or exchange (a past chat turn).")
    metadata = serializers.JSONField()
    document_id = serializers.UUIDField(required=False, help_text="The file it came from.")
    source = serializers.CharField(required=False, help_text="The file's name or URL.")
    page = serializers.IntegerField(required=False, help_text="The PDF page (from 1).")
    section = serializers.CharField(required=False, help_text="The heading it is under.")

    class Meta:
        ref_name = "ContextHit"


class ContextSearchOutputSerializer(serializers.Serializer):
    results = ContextHitSerializer(many=True, help_text="Closest first.")

    class Meta:
        ref_name = "ContextSearchResults"


def _job_body(job_id: str) -> dict:
    return {"job_id": job_id, "status": "queued"}


_UNAVAILABLE = error_responses(503)


@extend_schema(tags=["Context"])
class AgentContextApi(ProjectScopedApi):
    throttle_scopes = {"GET": "searches", "POST": "ingests"}

    @extend_schema(
        operation_id="context_search",
        summary="Search an agent's context memory",
        description="The documents and past exchanges closest to `q`. The search runs on a "
        "worker: 503 when none answers within CONTEXT_SEARCH_TIMEOUT_SECONDS.",
        parameters=[ContextSearchSerializer],
        responses={200: ContextSearchOutputSerializer, **_UNAVAILABLE},
    )
    def get(self, request, project_id, agent_id):
        # Never called: the route serves GET in context.waits.agent_context (async, no
        # thread held while a worker searches). Declared here for the schema only.
        raise exceptions.MethodNotAllowed(request.method)

    @extend_schema(
        operation_id="context_add",
        summary="Add documents to an agent's context memory",
        description="Queues a job that chunks, embeds and stores the documents (202); "
        "follow it at …/context/jobs/{job_id}/.",
        request=ContextInputSerializer,
        responses={202: ContextJobAcceptedSerializer, **_UNAVAILABLE},
    )
    def post(self, request, project_id, agent_id):
        agent = agent_get(project=self.project, agent_id=agent_id)
        data = ContextInputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        job_id = context_documents_add(agent=agent, documents=data.validated_data["documents"])
        return Response(_job_body(job_id), status=status.HTTP_202_ACCEPTED)

    @extend_schema(
        operation_id="context_clear",
        summary="Clear an agent's context memory",
        description="Queues a job that forgets every document and exchange (202).",
        request=None,
        responses={202: ContextJobAcceptedSerializer, **_UNAVAILABLE},
    )
    def delete(self, request, project_id, agent_id):
        agent = agent_get(project=self.project, agent_id=agent_id)
        job_id = context_clear_enqueue(agent=agent)
        return Response(_job_body(job_id), status=status.HTTP_202_ACCEPTED)


@extend_schema(tags=["Context"])
class AgentContextJobApi(ProjectScopedApi):
    @extend_schema(
        operation_id="context_job_retrieve",
        summary="Follow a context job",
        description="An add or clear job's progress; jobs are kept for a day.",
        responses={200: ContextJobSerializer, **_UNAVAILABLE},
    )
    def get(self, request, project_id, agent_id, job_id):
        agent = agent_get(project=self.project, agent_id=agent_id)
        job = context_job_get(agent=agent, job_id=job_id)
        if job is None:
            raise Http404("No such context job.")
        return Response(ContextJobSerializer(job).data)
