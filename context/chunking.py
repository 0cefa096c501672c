"""Cutting documents into the pieces an agent's context stores, and naming them."""

from __future__ import annotations

import hashlib
import re
import uuid

CHUNK_CHARS = 1000
CHUNK_OVERLAP = 120
# Points of one agent are named by content: storing the same text twice (a redelivered
# job, a repeated document) keeps one point.
POINT_NAMESPACE = uuid.UUID("6f1d7a52-2a0e-4c59-9d7e-3f1b8c0a9e51")


def chunk_text(text: str, *, size: int = CHUNK_CHARS, overlap: int = CHUNK_OVERLAP) -> list[str]:
    """Split text into pieces of at most `size` characters, cut at paragraph, sentence or
    word boundaries where possible, each repeating the tail of the previous one."""
    text = re.sub(r"[ \t]+", " ", text).strip()
    if not text:
        return []
    if len(text) <= size:
        return [text]
    chunks: list[str] = []
    start = 0
    while start < len(text):
        end = min(start + size, len(text))
        if end < len(text):
            window = text[start:end]
            cut = -1
            for sep in ("\n\n", "\n", ". ", "! ", "? ", "; ", " "):
                cut = window.rfind(sep, size // 2)
                if cut != -1:
                    end = start + cut + len(sep)
                    break
        piece = text[start:end].strip()
        if piece:
            chunks.append(piece)
        if end >= len(text):
            break
        # Step back by the overlap, to a word start.
        next_start = max(end - overlap, start + 1)
        space = text.find(" ", next_start, end)
        start = space + 1 if space != -1 else next_start
    return chunks


def point_id(collection: str, text: str) -> str:
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return str(uuid.uuid5(POINT_NAMESPACE, f"{collection}:{digest}"))


def document_point_key(*, document_id: uuid.UUID | str, index: int) -> str:
    """What names a file chunk's point (not its text: two documents may share a
    passage, and deleting one must not take the other's point)."""
    return f"document:{uuid.UUID(str(document_id))}:{int(index)}"


def document_point_keys(*, document_id: uuid.UUID | str, chunks: int) -> list[str]:
    """The keys of a document's `chunks` points."""
    return [document_point_key(document_id=document_id, index=i) for i in range(chunks)]
