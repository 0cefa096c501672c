"""Files an agent's context ingests: their type, their text by structure, their chunks.

Parsed by maintained libraries: pypdf (PDF, page by page), python-docx (DOCX, headings
by paragraph style), html2text (HTML to Markdown, so headings survive); Markdown by its
ATX headings; CSV as rows under their header; text by paragraphs. Chunks follow that
structure: a chunk never spans two pages or two sections, long ones are cut at
paragraph, sentence or word boundaries with overlap (context.chunking.chunk_text), and
each chunk knows its page and the heading path above it (its section).

Everything here runs on a worker (the libraries and the CPU are the worker's).
"""

from __future__ import annotations

import csv
import io
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, replace

import docx
import html2text
from pypdf import PdfReader

from .chunking import CHUNK_CHARS, chunk_text
from .filetypes import FileRefused

_LABELS = {"pdf": "PDF", "docx": "DOCX", "html": "HTML", "csv": "CSV"}
# Parts of a DOCX (a zip): a document has tens; each is one more read.
DOCX_MAX_MEMBERS = 10_000
_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")


@dataclass(frozen=True)
class Section:
    text: str
    page: int | None = None
    section: str | None = None


@dataclass(frozen=True)
class FileChunk:
    text: str
    index: int
    page: int | None
    section: str | None


def _decode(data: bytes) -> str:
    for encoding in ("utf-8-sig", "utf-16") if data[:2] in (b"\xff\xfe", b"\xfe\xff") else (
        "utf-8-sig",
    ):  # fmt: skip
        try:
            return data.decode(encoding)
        except UnicodeDecodeError:
            continue
    raise FileRefused("the file is not UTF-8 text")


def parse(
    data: bytes, *, kind: str, max_pages: int, max_chars: int, max_unpacked: int
) -> list[Section]:
    """The file's text in structural sections; FileRefused when it cannot be read, or
    holds more than `max_pages` pages, `max_chars` characters of text or (a DOCX, a zip)
    `max_unpacked` bytes unpacked. Those limits are checked as the file is read, so a
    small file that unpacks or parses to far more is refused before it is read whole."""
    readers: dict[str, Callable[[], list[Section]]] = {
        "pdf": lambda: _pdf(data, max_pages=max_pages, max_chars=max_chars),
        "docx": lambda: _docx(data, max_chars=max_chars, max_unpacked=max_unpacked),
        "html": lambda: _html(data),
        "markdown": lambda: _markdown(_decode(data)),
        "csv": lambda: _csv(_decode(data)),
        "text": lambda: [Section(_decode(data))],
    }
    if kind not in readers:
        raise FileRefused(f"unsupported file type {kind!r}")
    try:
        sections = readers[kind]()
    except FileRefused:
        raise
    # The parsers raise more than their documented errors on a malformed file (pypdf:
    # NotImplementedError for an unknown filter, AttributeError for a broken trailer; its
    # own limit on what a stream decompresses to): the file cannot be read, whatever the
    # library's reason.
    except Exception as exc:
        raise FileRefused(
            f"the {_LABELS.get(kind, kind)} cannot be read: {type(exc).__name__}: {exc}"
        ) from exc
    # A NUL carries no text, and PostgreSQL's text refuses it (the document's write would
    # fail the job on every try).
    sections = [replace(s, text=s.text.replace("\x00", "")) if "\x00" in s.text else s
                for s in sections]  # fmt: skip
    _within(sum(len(s.text) for s in sections), max_chars)
    if not any(s.text.strip() for s in sections):
        raise FileRefused("the file holds no text (a scanned PDF needs OCR first)")
    return sections


def _within(chars: int, max_chars: int) -> None:
    if chars > max_chars:
        raise FileRefused(f"the file holds over {max_chars} characters of text (the limit)")


def _pdf(data: bytes, *, max_pages: int, max_chars: int) -> list[Section]:
    reader = PdfReader(io.BytesIO(data))
    if reader.is_encrypted:
        raise FileRefused("the PDF is encrypted")
    pages = len(reader.pages)
    if pages > max_pages:
        raise FileRefused(f"the PDF has {pages} pages; the limit is {max_pages}")
    sections, chars = [], 0
    for number, page in enumerate(reader.pages, start=1):
        sections.append(Section(page.extract_text() or "", page=number))
        chars += len(sections[-1].text)
        _within(chars, max_chars)
    return sections


def _docx_unpacked_check(data: bytes, *, max_unpacked: int) -> None:
    """Refuse a DOCX that unpacks to more than `max_unpacked` bytes before python-docx
    reads it whole: a few MB of repeated XML can unpack to GBs, and parsing them holds a
    worker for minutes. zipfile stops every member at its declared size (and fails its
    checksum past it), so the declared sizes bound what is read."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        members = archive.infolist()
    unpacked = sum(member.file_size for member in members)
    if unpacked > max_unpacked or len(members) > DOCX_MAX_MEMBERS:
        raise FileRefused(
            f"the DOCX unpacks to {unpacked} bytes in {len(members)} parts; the limits are "
            f"{max_unpacked} bytes and {DOCX_MAX_MEMBERS} parts"
        )


def _docx(data: bytes, *, max_chars: int, max_unpacked: int) -> list[Section]:
    _docx_unpacked_check(data, max_unpacked=max_unpacked)
    document = docx.Document(io.BytesIO(data))
    sections: list[Section] = []
    path: list[str] = []
    lines: list[str] = []
    chars = 0

    def flush() -> None:
        if lines:
            sections.append(Section("\n\n".join(lines), section=" / ".join(path) or None))
            lines.clear()

    for paragraph in document.paragraphs:
        style = (paragraph.style.name if paragraph.style is not None else "") or ""
        text = paragraph.text.strip()
        match = re.match(r"Heading (\d)", style)
        if match and text:
            flush()
            level = int(match[1])
            del path[level - 1 :]
            path.append(text)
        elif text:
            lines.append(text)
        chars += len(text)
        _within(chars, max_chars)
    flush()
    for table in document.tables:
        rows = [" | ".join(c.text.strip() for c in row.cells) for row in table.rows]
        sections.append(Section("\n".join(rows), section="table"))
        chars += len(sections[-1].text)
        _within(chars, max_chars)
    return sections


def _html(data: bytes) -> list[Section]:
    converter = html2text.HTML2Text()
    converter.body_width = 0  # no hard wrapping: paragraphs stay lines
    converter.ignore_images = True
    converter.ignore_links = True
    try:
        text = converter.handle(_decode(data))
    except FileRefused:
        raise
    except Exception as exc:
        raise FileRefused(f"the HTML cannot be read: {exc}") from exc
    return _markdown(text)


def _markdown(text: str) -> list[Section]:
    sections: list[Section] = []
    path: list[tuple[int, str]] = []
    lines: list[str] = []
    fence = False

    def flush() -> None:
        body = "\n".join(lines).strip()
        if body:
            sections.append(Section(body, section=" / ".join(t for _, t in path) or None))
        lines.clear()

    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fence = not fence
        match = None if fence else _HEADING.match(line)
        if match:
            flush()
            level = len(match[1])
            path = [(lv, t) for lv, t in path if lv < level] + [(level, match[2].strip())]
        else:
            lines.append(line)
    flush()
    return sections


def _csv(text: str) -> list[Section]:
    """Rows under their header: each section holds the header and as many rows as fit a
    chunk, so every chunk says what its columns are."""
    try:
        rows = list(csv.reader(io.StringIO(text)))
    except csv.Error as exc:
        raise FileRefused(f"the CSV cannot be read: {exc}") from exc
    if not rows:
        return []
    header, body = ", ".join(rows[0]), rows[1:]
    sections, lines, size, first = [], [], len(header), 2
    for number, row in enumerate(body, start=2):
        line = ", ".join(row)
        if lines and size + len(line) + 1 > CHUNK_CHARS:
            sections.append(
                Section(header + "\n" + "\n".join(lines), section=f"rows {first}-{number - 1}")
            )
            lines, size, first = [], len(header), number
        lines.append(line)
        size += len(line) + 1
    if lines or not body:
        last = first + len(lines) - 1
        sections.append(Section(header + "\n" + "\n".join(lines), section=f"rows {first}-{last}"))
    return sections


def chunk_sections(sections: list[Section]) -> list[FileChunk]:
    """Chunks that follow the sections: a chunk never spans two; each keeps its page
    and section. The section's heading path leads each of its chunks, so a chunk found
    alone still says what it is about."""
    chunks: list[FileChunk] = []
    for section in sections:
        heading = (section.section or "")[:200]
        lead = f"{heading}\n" if heading and heading != "table" else ""
        for piece in chunk_text(section.text, size=CHUNK_CHARS - len(lead)):
            chunks.append(FileChunk(lead + piece, len(chunks), section.page, section.section))
    return chunks
