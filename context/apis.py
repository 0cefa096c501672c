"""An agent's context (RAG memory): add documents, search, clear, and the jobs' status."""

import json
import re
from urllib.parse import urlsplit

from django.conf import settings
from django.http import Http404
from drf_spectacular.utils import extend_schema, extend_schema_field
from rest_framework import exceptions, serializers, status
from rest_framework.parsers import MultiPartParser
from rest_framework.response import Response

from agents.selectors import agent_get
from common.api import (
    NOT_BLANK,
    EnvelopeListMixin,
    EnvelopePagination,
    StrictSerializer,
    TextField,
)
from common.exceptions import PayloadTooLarge
from common.parsers import JSONParser
from common.schema import error_responses
from common.validators import MAX_TEXT_BYTES, validate_text_size
from projects.idempotency import idempotent
from projects.mixins import ProjectScopedApi

from .filetypes import file_type
from .selectors import context_document_get, context_document_list, context_job_get
from .services import (
    context_clear_enqueue,
    context_document_delete,
    context_documents_add,
    context_file_add,
)
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
        choices=("add", "clear", "file"),
        help_text="add: store documents; clear: forget everything; file: parse and store "
        "a file (…/context/files/).",
    )
    agent_id = serializers.UUIDField()
    status = serializers.ChoiceField(choices=JOB_STATUSES)
    documents = serializers.IntegerField(required=False, help_text="add: documents to store.")
    stored_documents = serializers.IntegerField(
        required=False, help_text="add: documents stored so far."
    )
    chunks = serializers.IntegerField(required=False, help_text="add: chunks stored so far.")
    error = serializers.CharField(required=False, help_text="Why the job ended in error.")
    document_id = serializers.UUIDField(required=False, help_text="file: its document.")
    duplicate_of = serializers.UUIDField(
        required=False, help_text="file: the document that already holds these bytes."
    )
    pages = serializers.IntegerField(required=False, help_text="file: PDF pages parsed.")
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
    @idempotent
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


# --- Files ---------------------------------------------------------------------------

MAX_URL_CHARS = 2000
FILE_STATUSES = ("queued", "running", "ready", "error")


class ContextFileInputSerializer(StrictSerializer):
    file = serializers.FileField(
        required=False,
        allow_empty_file=False,
        help_text="The file (multipart/form-data): PDF, DOCX, HTML, Markdown, CSV or text, "
        "by its name's extension, its content type or (PDF) its first bytes; at most "
        "CONTEXT_FILE_MAX_BYTES.",
    )
    url = serializers.URLField(
        required=False,
        max_length=MAX_URL_CHARS,
        help_text="Or an http(s) URL a worker fetches through the egress guard (public "
        "addresses only, unless the operator opened EGRESS_ALLOW_NETWORKS_FILES).",
    )
    name = serializers.CharField(
        required=False, max_length=500, help_text="The source name to cite (default: the "
        "file's name, or the URL).",
    )  # fmt: skip

    class Meta:
        ref_name = "ContextFileInput"

    def validate_url(self, value: str) -> str:
        if urlsplit(value).scheme not in ("http", "https"):
            raise serializers.ValidationError("Must be an http(s) URL.")
        return value

    def validate(self, attrs):
        attrs = super().validate(attrs)
        if ("file" in attrs) == ("url" in attrs):
            raise serializers.ValidationError({"file": ["Give a file or a url: exactly one."]})
        upload = attrs.get("file")
        if upload is not None:
            if upload.size > settings.CONTEXT_FILE_MAX_BYTES:
                raise PayloadTooLarge(
                    f"The file is larger than {settings.CONTEXT_FILE_MAX_BYTES} bytes."
                )
            head = upload.read(8)
            upload.seek(0)
            kind = file_type(name=upload.name or "", content_type=upload.content_type or "",
                             head=head)  # fmt: skip
            if kind not in settings.CONTEXT_FILE_TYPES:
                allowed = ", ".join(settings.CONTEXT_FILE_TYPES)
                raise serializers.ValidationError(
                    {"file": [f"Unsupported file type; one of: {allowed}."]}
                )
            attrs["file_type"] = kind
        return attrs


class ContextDocumentSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    source = serializers.CharField(help_text="The file's name, or its URL.")
    file_type = serializers.CharField(help_text="pdf, docx, html, markdown, csv or text.")
    content_hash = serializers.CharField(help_text="SHA-256 of the bytes (empty until fetched).")
    size_bytes = serializers.IntegerField()
    pages = serializers.IntegerField(allow_null=True, help_text="PDF pages.")
    chunks = serializers.IntegerField(help_text="Chunks stored (or being stored).")
    status = serializers.ChoiceField(choices=FILE_STATUSES)
    error = serializers.CharField(help_text="Why it could not be ingested.")
    job_id = serializers.UUIDField(
        allow_null=True, help_text="Follow it at …/context/jobs/{job_id}/."
    )
    created_at = serializers.DateTimeField()

    class Meta:
        ref_name = "ContextDocument"


class ContextDocumentDetailSerializer(ContextDocumentSerializer):
    text = serializers.CharField(help_text="The text as parsed (what was chunked).")

    class Meta:
        ref_name = "ContextDocumentDetail"


class ContextFileAcceptedSerializer(ContextDocumentSerializer):
    created = serializers.BooleanField(
        help_text="false: this agent already has these bytes (that document; nothing added). "
        "true: queued, as a new document or as that one, if it had failed."
    )

    class Meta:
        ref_name = "ContextFileAccepted"


@extend_schema(tags=["Context"])
class AgentContextFileListApi(EnvelopeListMixin, ProjectScopedApi):
    throttle_scopes = {"POST": "ingests"}
    parser_classes = [MultiPartParser, JSONParser]
    pagination_class = EnvelopePagination.of("documents")

    @staticmethod
    def max_body_bytes() -> int:
        """The file a request may carry (common.asgi refuses a larger body unread)."""
        return settings.CONTEXT_FILE_MAX_BYTES

    @extend_schema(
        operation_id="context_files_list",
        summary="List the files of an agent's context",
        description="Oldest first, with their status (queued, running, ready, error).",
        responses={200: ContextDocumentSerializer(many=True)},
    )
    def get(self, request, project_id, agent_id):
        agent = agent_get(project=self.project, agent_id=agent_id)
        return self.list_response(context_document_list(agent=agent), ContextDocumentSerializer)

    @extend_schema(
        operation_id="context_files_add",
        summary="Add a file to an agent's context",
        description="Takes exactly one of `file` (multipart) and `url` (neither or both "
        "is a 400). Queues a job (bulk work on the project's bus) that parses the file, "
        "cuts it by its structure (headings, pages, paragraphs, with overlap) and stores "
        "its chunks with their source, page and section (202). The same bytes again for "
        "this agent add nothing (200, `created: false`), unless their document failed "
        "(ended in error, or its job was lost): then it is queued again (202). A file "
        "that cannot be read (corrupt, encrypted, over CONTEXT_FILE_MAX_PAGES or _CHARS) "
        "ends the job in error with the reason, nothing stored.",
        request={
            "multipart/form-data": ContextFileInputSerializer,
            "application/json": ContextFileInputSerializer,
        },
        responses={
            202: ContextFileAcceptedSerializer,
            200: ContextFileAcceptedSerializer,
            **error_responses(413),
            **_UNAVAILABLE,
        },
    )
    def post(self, request, project_id, agent_id):
        agent = agent_get(project=self.project, agent_id=agent_id)
        data = ContextFileInputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        values = data.validated_data
        upload = values.get("file")
        if upload is not None:
            document, created = context_file_add(
                agent=agent,
                source=values.get("name") or upload.name or "file",
                data=upload.read(),
                file_type=values["file_type"],
            )
        else:
            document, created = context_file_add(
                agent=agent, source=values.get("name") or values["url"], url=values["url"]
            )
        body = {**ContextDocumentSerializer(document).data, "created": created}
        return Response(body, status=status.HTTP_202_ACCEPTED if created else status.HTTP_200_OK)


@extend_schema(tags=["Context"])
class AgentContextFileDetailApi(ProjectScopedApi):
    def _document(self, agent_id, document_id):
        agent = agent_get(project=self.project, agent_id=agent_id)
        return context_document_get(agent=agent, document_id=document_id)

    @extend_schema(
        operation_id="context_files_retrieve",
        summary="Read a file of an agent's context back",
        description="Its record and its text as parsed.",
        responses={200: ContextDocumentDetailSerializer},
    )
    def get(self, request, project_id, agent_id, document_id):
        document = self._document(agent_id, document_id)
        return Response(ContextDocumentDetailSerializer(document).data)

    @extend_schema(
        operation_id="context_files_destroy",
        summary="Delete a file from an agent's context",
        description="The record at once; its points (exactly those) on a worker after.",
        responses={204: None, **_UNAVAILABLE},
    )
    def delete(self, request, project_id, agent_id, document_id):
        context_document_delete(document=self._document(agent_id, document_id))
        return Response(status=status.HTTP_204_NO_CONTENT)
