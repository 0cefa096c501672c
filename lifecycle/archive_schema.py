"""What an archive may hold, checked before anything of it is written.

`archive_open` reads an archive (a path or an uploaded file) without trusting it: it is
a zip of at most IMPORT_MAX_FILES members, none encrypted, linked, nested in folders
other than `context/`, or named outside the format (so nothing can be written anywhere
by name: members are only ever read into memory); the sizes the zip declares add up to
at most IMPORT_MAX_UNPACKED_BYTES, no member claims a ratio deflate cannot make (a
zip bomb's sign), and reading never yields more than was declared (zipfile stops there
and checks the CRC). Every line is a JSON object (no NaN, bounded nesting).

Records are then checked against each section's schema (`record`, `of_field`: the
model field's own type, length, choices and validators) and against each other: ids
unique, every reference naming a record of the same archive (`refs`), so an import can
only ever point at what it makes itself.
"""

from __future__ import annotations

import json
import re
import uuid
import zipfile
from collections.abc import Callable, Iterable
from typing import IO, Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models
from django.utils.dateparse import parse_date, parse_datetime

Check = Callable[[Any, str], None]

MANIFEST = "manifest.json"
SECTION_FILE_RE = re.compile(r"^([a-z][a-z_]{0,63})\.jsonl$")
CONTEXT_FILE_RE = re.compile(
    r"^context/([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})\.jsonl$"
)
# Deflate cannot shrink anything more than about 1032 to 1: a member that claims more
# lies about its size.
MAX_RATIO = 1100
MAX_JSON_DEPTH = 64
# A context document's text (an export writes chunks of CHUNK_CHARS).
MAX_CONTEXT_TEXT = 100_000


class ArchiveInvalid(ValueError):
    """What is wrong with an archive, in words for its uploader (a 400)."""


# Date fields: their parser and what the error calls them.
_DATE_PARSERS = {
    "DateTimeField": (parse_datetime, "date and time"),
    "DateField": (parse_date, "date"),
}


def fail(path: str, message: str) -> None:
    raise ArchiveInvalid(f"{path}: {message}" if path else message)


# --- Values ---------------------------------------------------------------------------

_INTEGER_TYPES = {
    "IntegerField", "BigIntegerField", "SmallIntegerField", "PositiveIntegerField",
    "PositiveBigIntegerField", "PositiveSmallIntegerField", "BigAutoField", "AutoField",
}  # fmt: skip
_TEXT_TYPES = {"CharField", "TextField", "URLField", "SlugField", "EmailField"}


def _text(value: Any, path: str) -> None:
    if not isinstance(value, str):
        fail(path, "must be a string")
    if "\x00" in value:
        fail(path, "must not hold NUL characters")


def _integer(value: Any, path: str) -> None:
    if type(value) is not int:
        fail(path, "must be an integer")


def of_field(model: type[models.Model], name: str, *, null: bool | None = None) -> Check:
    """The model field's rules: its JSON type, null, length, choices, validators."""
    field = model._meta.get_field(name)
    kind = field.get_internal_type()
    allow_null = field.null if null is None else null
    choices = {str(c[0]) for c in field.choices} if field.choices else None

    def check(value: Any, path: str) -> None:
        if value is None:
            if not allow_null:
                fail(path, "must not be null")
            return
        if kind in _TEXT_TYPES:
            _text(value, path)
        elif kind in _INTEGER_TYPES:
            _integer(value, path)
        elif kind == "FloatField":
            if type(value) not in (int, float):
                fail(path, "must be a number")
        elif kind == "BooleanField":
            if type(value) is not bool:
                fail(path, "must be true or false")
        elif kind in _DATE_PARSERS:
            _text(value, path)
            parse, what = _DATE_PARSERS[kind]
            try:
                parsed = parse(value)
            except ValueError:
                parsed = None
            if parsed is None:
                fail(path, f"must be an ISO 8601 {what}")
            return
        elif kind == "UUIDField":
            uuid_text(value, path)
            return
        elif kind == "JSONField":
            # The shape of its default (a list, an object), when it has one.
            shape = type(field.default()) if callable(field.default) else None
            if shape in (dict, list) and not isinstance(value, shape):
                fail(path, f"must be {'an object' if shape is dict else 'a list'}")
        else:
            raise TypeError(f"no archive rule for {kind}")
        if choices is not None and str(value) not in choices and not (field.blank and value == ""):
            fail(path, f"must be one of {', '.join(sorted(choices))}")
        try:
            field.run_validators(value)
        except ValidationError as exc:
            fail(path, " ".join(exc.messages))

    return check


def uuid_text(value: Any, path: str) -> None:
    _text(value, path)
    try:
        uuid.UUID(value)
    except ValueError:
        fail(path, "must be a UUID")


def nullable(check: Check) -> Check:
    def inner(value: Any, path: str) -> None:
        if value is not None:
            check(value, path)

    return inner


def string(max_length: int) -> Check:
    def check(value: Any, path: str) -> None:
        _text(value, path)
        if len(value) > max_length:
            fail(path, f"must be at most {max_length} characters")

    return check


def integer(*, min_value: int = 0) -> Check:
    def check(value: Any, path: str) -> None:
        _integer(value, path)
        if value < min_value:
            fail(path, f"must be at least {min_value}")

    return check


def choice(values: Iterable[str]) -> Check:
    allowed = set(values)

    def check(value: Any, path: str) -> None:
        if value not in allowed:
            fail(path, f"must be one of {', '.join(sorted(allowed))}")

    return check


def json_object(value: Any, path: str) -> None:
    if not isinstance(value, dict):
        fail(path, "must be an object")


def list_of(item: Check, *, max_items: int = 100_000) -> Check:
    def check(value: Any, path: str) -> None:
        if not isinstance(value, list):
            fail(path, "must be a list")
        if len(value) > max_items:
            fail(path, f"must hold at most {max_items} items")
        for i, element in enumerate(value):
            item(element, f"{path}[{i}]")

    return check


def record(fields: dict[str, Check], *, optional: Iterable[str] = ()) -> Check:
    """An object with exactly these fields (those in `optional` may be missing)."""
    may_miss = set(optional)

    def check(value: Any, path: str) -> None:
        if not isinstance(value, dict):
            fail(path, "must be an object")
        unknown = sorted(value.keys() - fields.keys())
        if unknown:
            fail(path, f"unknown field {unknown[0]!r}")
        for name, inner in fields.items():
            if name not in value:
                if name in may_miss:
                    continue
                fail(path, f"missing field {name!r}")
            inner(value[name], f"{path}.{name}" if path else name)

    return check


def unique(rows: list[dict[str, Any]], fields: tuple[str, ...], where: str) -> None:
    seen: set[tuple] = set()
    for i, row in enumerate(rows):
        key = tuple(json.dumps(row.get(f), sort_keys=True) for f in fields)
        if key in seen:
            fail(f"{where} line {i + 1}", f"{'/'.join(fields)} repeats an earlier record's")
        seen.add(key)


# --- Reading ----------------------------------------------------------------------------


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _depth(value: Any, limit: int) -> bool:
    """False when `value` nests deeper than `limit`."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return False
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return True


def _json(data: bytes, where: str) -> Any:
    try:
        value = json.loads(data.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        fail(where, f"not JSON ({type(exc).__name__})")
    if not _depth(value, MAX_JSON_DEPTH):
        fail(where, f"nests deeper than {MAX_JSON_DEPTH}")
    return value


def _member_check(info: zipfile.ZipInfo) -> None:
    name = info.filename
    if name.startswith(("/", "\\")) or "\\" in name or ".." in name.split("/") or ":" in name:
        fail(name, "a member's name must be relative, without '..'")
    if info.is_dir():
        fail(name, "folders are not part of the format")
    if not (name == MANIFEST or SECTION_FILE_RE.match(name) or CONTEXT_FILE_RE.match(name)):
        fail(name, "not a file of the archive format")
    if info.flag_bits & 0x1:
        fail(name, "encrypted members are not read")
    if (info.external_attr >> 16) & 0o170000 == 0o120000:
        fail(name, "links are not read")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        fail(name, "only stored or deflated members are read")
    if info.file_size > max(info.compress_size, 1) * MAX_RATIO:
        fail(name, "claims a compression ratio deflate cannot make")


def archive_open(source: str | IO[bytes]) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """(manifest, {member name: its records}) of an archive, read within the limits; raises
    ArchiveInvalid. Records are checked against the sections by `lifecycle.exports`."""
    try:
        archive = zipfile.ZipFile(source)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise ArchiveInvalid(f"not a zip archive ({exc})") from None
    with archive:
        infos = archive.infolist()
        if len(infos) > settings.IMPORT_MAX_FILES:
            fail("", f"more than {settings.IMPORT_MAX_FILES} files")
        names = [info.filename for info in infos]
        if len(set(names)) != len(names):
            fail("", "a file name repeats")
        for info in infos:
            _member_check(info)
        if sum(info.file_size for info in infos) > settings.IMPORT_MAX_UNPACKED_BYTES:
            fail("", f"unpacks to more than {settings.IMPORT_MAX_UNPACKED_BYTES} bytes")
        if MANIFEST not in names:
            fail("", f"no {MANIFEST}")
        files: dict[str, list[Any]] = {}
        manifest: Any = None
        for info in infos:
            try:
                if info.filename == MANIFEST:
                    manifest = _json(_whole(archive, info), MANIFEST)
                else:
                    files[info.filename] = _records(archive, info)
            except ArchiveInvalid:
                raise  # what is wrong, said where (a ValueError too)
            except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
                raise ArchiveInvalid(f"{info.filename}: unreadable ({exc})") from None
    return manifest, files


def _whole(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    with archive.open(info) as handle:
        data = handle.read(info.file_size + 1)
    if len(data) != info.file_size:
        fail(info.filename, "is not the size the archive declares")
    return data


def _records(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> list[Any]:
    """A member's JSON lines, read line by line: what is held is the records, never the
    member's bytes too (at IMPORT_MAX_UNPACKED_BYTES, those were a copy of it twice
    over)."""
    rows, n, size = [], 0, 0
    with archive.open(info) as handle:
        for chunk in handle:  # up to each "\n"
            size += len(chunk)
            if size > info.file_size:
                break
            for line in chunk.splitlines():  # as bytes.splitlines: "\r" ends one too
                n += 1
                if line.strip():
                    rows.append(_json(line, f"{info.filename} line {n}"))
    if size != info.file_size:
        fail(info.filename, "is not the size the archive declares")
    return rows
