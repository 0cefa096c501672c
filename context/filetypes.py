"""The files an agent's context takes: their types and content hashes (no parser here:
the web side validates with this; context.files parses on workers)."""

from __future__ import annotations

import hashlib

FILE_TYPES = ("pdf", "docx", "html", "markdown", "csv", "text")
_EXTENSIONS = {
    ".pdf": "pdf",
    ".docx": "docx",
    ".html": "html",
    ".htm": "html",
    ".md": "markdown",
    ".markdown": "markdown",
    ".csv": "csv",
    ".txt": "text",
    ".text": "text",
}
_CONTENT_TYPES = {
    "application/pdf": "pdf",
    "application/vnd.openxmlformats-officedocument.wordprocessingml.document": "docx",
    "text/html": "html",
    "text/markdown": "markdown",
    "text/csv": "csv",
    "text/plain": "text",
}


class FileRefused(ValueError):
    """A file that cannot be ingested (bad, encrypted, over a limit): the job's error."""


def file_type(*, name: str, content_type: str = "", head: bytes = b"") -> str | None:
    """The file's type from its name, its declared content type or its first bytes."""
    if head.startswith(b"%PDF-"):
        return "pdf"
    lower = name.lower()
    for ext, kind in _EXTENSIONS.items():
        if lower.endswith(ext):
            return kind
    return _CONTENT_TYPES.get(content_type.split(";")[0].strip().lower())


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
