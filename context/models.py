"""Documents (files) in an agent's context: what was ingested, from where, and how."""

from __future__ import annotations

import uuid

from django.db import models

from agents.models import Agent


class ContextDocument(models.Model):
    """A file (upload or URL) ingested into an agent's context. Its chunks are points in
    the vector store, named by (document, chunk index), so deleting the document removes
    exactly its points; the content hash makes a second upload of the same bytes add
    nothing."""

    class Status(models.TextChoices):
        QUEUED = "queued"
        RUNNING = "running"
        READY = "ready"
        ERROR = "error"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    agent = models.ForeignKey(Agent, on_delete=models.CASCADE, related_name="documents")
    source = models.CharField(max_length=500)  # the file's name, or its URL
    file_type = models.CharField(max_length=16, blank=True, default="")
    # Empty until a URL's bytes are fetched; then unique per agent.
    content_hash = models.CharField(max_length=64, blank=True, default="")
    size_bytes = models.PositiveBigIntegerField(default=0)
    pages = models.PositiveIntegerField(null=True, blank=True)
    chunks = models.PositiveIntegerField(default=0)
    status = models.CharField(max_length=8, choices=Status.choices, default=Status.QUEUED)
    error = models.TextField(blank=True, default="")
    job_id = models.UUIDField(null=True, blank=True)
    # The text as parsed, to read the document back (at most CONTEXT_FILE_MAX_CHARS).
    text = models.TextField(blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["created_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["agent", "content_hash"],
                condition=~models.Q(content_hash=""),
                name="context_document_unique_content",
            )
        ]
        indexes = [
            # The recovery pass's look for documents whose job was lost.
            models.Index(
                fields=["updated_at"],
                condition=models.Q(status__in=["queued", "running"]),
                name="context_document_unfinished",
            )
        ]

    def __str__(self) -> str:
        return self.source
