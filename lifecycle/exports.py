"""Project export and import: one archive (a zip of JSON lines, one file per section,
plus each agent's context documents) that `archive_import` recreates under another
owner with new ids, embedding the context again with the deployment's model.

Sections are a registry (`archive_section_register`): a feature that adds project data
(memory blocks, webhooks, schedules) registers a dump (the project's records, JSON
values, ids as strings) and a load (make them in the new project, mapping ids through
`ImportContext.ids`), in the order it must load. Secrets travel by name only, never by
value: the import lists the names to set again.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import IO, Any

from celery import current_app
from django.conf import settings
from django.db import transaction
from django.db.models import Count, Q, Sum
from django.db.models.functions import Coalesce
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from agentbus import ProjectGone, publish
from agents.models import Agent, AgentVersion, MemoryBlock, ProjectSecret, Tool
from automation.models import Schedule, WebhookEndpoint
from automation.schedules import ScheduleInvalid, timing_valid
from automation.webhooks import EVENT_TYPES, secret_new
from chat.models import ChatSession, Message, Run
from common.services import on_commit_robust
from context.services import context_documents_add
from context.vectors import context_documents
from governance.models import RunUsage, UsageDaily
from projects.models import Project
from projects.services import project_lock_for_write

from .archive_schema import (
    MAX_CONTEXT_TEXT,
    ArchiveInvalid,
    Check,
    archive_open,
    choice,
    fail,
    integer,
    json_object,
    list_of,
    nullable,
    of_field,
    record,
    string,
    unique,
    uuid_text,
)
from .models import ArchiveJob

FORMAT = "uws-project-archive"
VERSION = 1
EXPORT_TASK = "lifecycle.export_project"
IMPORT_TASK = "lifecycle.import_project"
# Documents per context job an import queues (each job is cut into short batches).
IMPORT_CONTEXT_JOB_DOCUMENTS = 500
ENDED = (ArchiveJob.Status.DONE, ArchiveJob.Status.ERROR)


def exports_dir(project_id: uuid.UUID | str) -> Path:
    return Path(settings.VAR_DIR) / "exports" / uuid.UUID(str(project_id)).hex


def archive_path(job: ArchiveJob) -> Path:
    return exports_dir(job.project_id) / f"{job.id.hex}.zip"


def exports_delete(*, project_id: uuid.UUID | str) -> None:
    """A deleted project's archives go with it."""
    shutil.rmtree(exports_dir(project_id), ignore_errors=True)


# --- Sections ------------------------------------------------------------------------------


@dataclass
class ImportContext:
    project: Project
    # Per kind ("agent", "session", "message", "run", "version"): old id -> new id.
    ids: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)

    def map(self, kind: str, old: Any) -> Any:
        return None if old is None else self.ids.get(kind, {}).get(str(old))


Rows = list[dict[str, Any]]


@dataclass(frozen=True)
class ArchiveSection:
    name: str
    dump: Callable[[Project], Iterable[dict[str, Any]]]
    load: Callable[[ImportContext, Rows], int]
    # Every record's shape (archive_schema.record); checked before anything is written.
    schema: Check
    # Fields naming another record of the archive: field -> the section it names (by
    # that section's "id"). A reference outside the archive is refused.
    refs: dict[str, str] = field(default_factory=dict)
    # Field tuples no two records share (the tables' unique constraints).
    unique: tuple[tuple[str, ...], ...] = ()
    # Further checks across sections: (rows, every file's rows) -> raise ArchiveInvalid.
    check: Callable[[Rows, dict[str, Rows]], None] | None = None


_SECTIONS: dict[str, ArchiveSection] = {}


def archive_section_register(
    name: str,
    *,
    dump: Callable[[Project], Iterable[dict[str, Any]]],
    load: Callable[[ImportContext, Rows], int],
    schema: Check,
    refs: dict[str, str] | None = None,
    unique: tuple[tuple[str, ...], ...] = (),
    check: Callable[[Rows, dict[str, Rows]], None] | None = None,
) -> None:
    """Add a section (in load order: register after the sections it refers to), with the
    schema its records must have in an archive that is imported."""
    _SECTIONS[name] = ArchiveSection(name=name, dump=dump, load=load, schema=schema,
                                     refs=refs or {}, unique=unique, check=check)  # fmt: skip


def archive_sections() -> list[str]:
    return list(_SECTIONS)


def _json(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    return value


def _row(values: dict[str, Any]) -> dict[str, Any]:
    return {key: _json(value) for key, value in values.items()}


def _when(text: str | None) -> datetime | None:
    return parse_datetime(text) if text else None


AGENT_FIELDS = ("id", "name", "system_prompt", "model", "params", "busy_policy", "created_at")
VERSION_FIELDS = ("number", "name", "system_prompt", "model", "params", "busy_policy", "tools",
                  "sections", "restored_from", "created_at")  # fmt: skip


def _dump_agents(project: Project) -> Iterator[dict[str, Any]]:
    for agent in Agent.objects.filter(project=project).order_by("created_at", "id"):
        versions = AgentVersion.objects.filter(agent=agent).order_by("number")
        yield {
            **_row({f: getattr(agent, f) for f in AGENT_FIELDS}),
            "versions": [_row({f: getattr(v, f) for f in VERSION_FIELDS}) for v in versions],
        }


def _load_agents(ctx: ImportContext, rows: list[dict[str, Any]]) -> int:
    for row in rows:
        agent = Agent.objects.create(
            project=ctx.project,
            **{f: row[f] for f in AGENT_FIELDS if f not in ("id", "created_at")},
        )
        Agent.objects.filter(id=agent.id).update(created_at=_when(row["created_at"]))
        ctx.ids.setdefault("agent", {})[row["id"]] = agent.id
        for version in row.get("versions", []):
            made = AgentVersion.objects.create(
                agent=agent, **{f: version[f] for f in VERSION_FIELDS if f != "created_at"}
            )
            AgentVersion.objects.filter(id=made.id).update(created_at=_when(version["created_at"]))
            ctx.ids.setdefault("version", {})[f"{row['id']}:{version['number']}"] = made.id
    # Agent tools inside versions name their target by id: remap them.
    for version in AgentVersion.objects.filter(agent__project=ctx.project):
        tools = [{**t, "target_agent_id": _str(ctx.map("agent", t.get("target_agent_id")))}
                 for t in version.tools]  # fmt: skip
        if tools != version.tools:
            AgentVersion.objects.filter(id=version.id).update(tools=tools)
    return len(rows)


def _str(value: Any) -> str | None:
    return None if value is None else str(value)


TOOL_FIELDS = ("kind", "name", "description", "parameters", "method", "url_template", "headers",
               "safe_to_repeat", "timeout_seconds")  # fmt: skip


def _dump_tools(project: Project) -> Iterator[dict[str, Any]]:
    tools = Tool.objects.filter(agent__project=project).order_by("agent__created_at", "name")
    for tool in tools:
        yield _row({"agent_id": tool.agent_id, "target_agent_id": tool.target_agent_id,
                    **{f: getattr(tool, f) for f in TOOL_FIELDS}})  # fmt: skip


def _load_tools(ctx: ImportContext, rows: list[dict[str, Any]]) -> int:
    Tool.objects.bulk_create(
        Tool(
            agent_id=ctx.map("agent", r["agent_id"]),
            target_agent_id=ctx.map("agent", r.get("target_agent_id")),
            **{f: r[f] for f in TOOL_FIELDS},
        )  # fmt: skip
        for r in rows
    )
    return len(rows)


def _dump_secrets(project: Project) -> Iterator[dict[str, Any]]:
    for name in ProjectSecret.objects.filter(project=project).values_list("name", flat=True):
        yield {"name": name}  # never the value


def _load_secrets(ctx: ImportContext, rows: list[dict[str, Any]]) -> int:
    ctx.notes["secrets_to_set"] = sorted(r["name"] for r in rows)
    return 0


def _dump_sessions(project: Project) -> Iterator[dict[str, Any]]:
    sessions = ChatSession.objects.filter(project=project).select_related("agent_version")
    for s in sessions.order_by("created_at", "id"):
        number = s.agent_version.number if s.agent_version else None
        yield _row({"id": s.id, "agent_id": s.agent_id, "title": s.title,
                    "agent_version": number, "created_at": s.created_at})  # fmt: skip


def _keep_times(model, objects: list, rows: list[dict[str, Any]], names: tuple[str, ...]) -> None:
    """auto_now_add overwrote the archive's times on create: put them back."""
    for obj, row in zip(objects, rows, strict=True):
        for name in names:
            setattr(obj, name, _when(row.get(name)))
    model.objects.bulk_update(objects, list(names), batch_size=1000)


def _load_sessions(ctx: ImportContext, rows: list[dict[str, Any]]) -> int:
    made = []
    for r in rows:
        version = ctx.map("version", f"{r['agent_id']}:{r['agent_version']}")
        made.append(
            ChatSession(
                id=uuid.uuid4(),
                project=ctx.project,
                title=r["title"],
                agent_id=ctx.map("agent", r["agent_id"]),
                agent_version_id=version if r["agent_version"] else None,
            )
        )
    ChatSession.objects.bulk_create(made, batch_size=1000)
    _keep_times(ChatSession, made, rows, ("created_at",))
    ctx.ids["session"] = {r["id"]: s.id for r, s in zip(rows, made, strict=True)}
    return len(made)


MESSAGE_FIELDS = ("role", "content", "status", "error")


def _dump_messages(project: Project) -> Iterator[dict[str, Any]]:
    messages = Message.objects.filter(session__project=project).order_by("id")
    for m in messages.values("id", "session_id", *MESSAGE_FIELDS, "created_at").iterator(2000):
        yield _row(m)


def _load_messages(ctx: ImportContext, rows: list[dict[str, Any]]) -> int:
    made = [Message(session_id=ctx.map("session", r["session_id"]),
                    **{f: r[f] for f in MESSAGE_FIELDS}) for r in rows]  # fmt: skip
    Message.objects.bulk_create(made, batch_size=1000)  # in order: new ids keep it
    _keep_times(Message, made, rows, ("created_at",))
    ctx.ids["message"] = {str(r["id"]): m.id for r, m in zip(rows, made, strict=True)}
    return len(made)


RUN_FIELDS = ("status", "error", "model", "steps", "depth", "starts", "attempt")
RUN_TIMES = ("created_at", "dispatched_at", "started_at", "finished_at")


def _dump_runs(project: Project) -> Iterator[dict[str, Any]]:
    runs = Run.objects.filter(session__project=project).select_related("agent_version")
    for run in runs.order_by("created_at", "id").iterator(2000):
        yield _row({"id": run.id, "session_id": run.session_id, "message_id": run.message_id,
                    "agent_id": run.agent_id, "parent_id": run.parent_id,
                    "agent_version": run.agent_version.number if run.agent_version else None,
                    **{f: getattr(run, f) for f in (*RUN_FIELDS, *RUN_TIMES)}})  # fmt: skip


def _load_runs(ctx: ImportContext, rows: list[dict[str, Any]]) -> int:
    new_ids = {r["id"]: uuid.uuid4() for r in rows}
    made = []
    for r in rows:
        version = r["agent_version"] and ctx.map("version", f"{r['agent_id']}:{r['agent_version']}")
        made.append(Run(id=new_ids[r["id"]], session_id=ctx.map("session", r["session_id"]),
                        message_id=ctx.map("message", r["message_id"]),
                        agent_id=ctx.map("agent", r["agent_id"]), agent_version_id=version or None,
                        **{f: r[f] for f in RUN_FIELDS}))  # fmt: skip
    Run.objects.bulk_create(made, batch_size=1000)
    for run, r in zip(made, rows, strict=True):
        run.parent_id = new_ids.get(r["parent_id"]) if r["parent_id"] else None
    Run.objects.bulk_update(made, ["parent_id"], batch_size=1000)
    _keep_times(Run, made, rows, RUN_TIMES)
    ctx.ids["run"] = {k: v for k, v in new_ids.items()}
    return len(made)


USAGE_SUMS = ("runs", "estimated_runs", "prompt_tokens", "completion_tokens", "total_tokens",
              "tool_calls", "latency_ms_sum", "latency_count", "embedding_tokens")  # fmt: skip


def _dump_usage(project: Project) -> Iterator[dict[str, Any]]:
    """Usage as daily rollups per (day, agent, model): the rollups retention made and the
    raw rows summed the same way."""
    totals: dict[tuple, dict[str, int]] = {}
    raw = (
        RunUsage.objects.filter(project_id=project.id)
        .values("day", "agent_id", "model")
        .annotate(
            runs=Count("run_id"),
            estimated_runs=Count("run_id", filter=Q(estimated=True)),
            prompt_tokens=Sum("prompt_tokens"),
            completion_tokens=Sum("completion_tokens"),
            total_tokens=Sum("total_tokens"),
            tool_calls=Sum("tool_calls"),
            latency_ms_sum=Coalesce(Sum("latency_ms"), 0),
            latency_count=Count("latency_ms"),
        )
        .order_by()
    )
    rolled = UsageDaily.objects.filter(project_id=project.id).values(
        "day", "agent_id", "model", *USAGE_SUMS
    )
    for row in [*raw, *rolled]:
        key = (row["day"], row["agent_id"], row["model"])
        entry = totals.setdefault(key, dict.fromkeys(USAGE_SUMS, 0))
        for name in USAGE_SUMS:
            entry[name] += row.get(name) or 0
    for (day, agent_id, model), sums in sorted(totals.items(), key=lambda i: str(i[0])):
        yield _row({"day": day, "agent_id": agent_id, "model": model, **sums})


def _load_usage(ctx: ImportContext, rows: list[dict[str, Any]]) -> int:
    UsageDaily.objects.bulk_create(
        UsageDaily(
            project_id=ctx.project.id,
            user_id=ctx.project.owner_id,
            agent_id=ctx.map("agent", r["agent_id"]),
            day=r["day"],
            model=r["model"],
            **{f: r[f] for f in USAGE_SUMS},
        )  # fmt: skip
        for r in rows
    )
    return len(rows)


# --- Schemas ------------------------------------------------------------------------------


def _fields(model, names: Iterable[str]) -> dict[str, Check]:
    return {name: of_field(model, name) for name in names}


TOOL_SNAPSHOT = record(
    {**_fields(Tool, TOOL_FIELDS), "target_agent_id": nullable(uuid_text)},
    optional=[f for f in TOOL_FIELDS if f not in ("kind", "name")] + ["target_agent_id"],
)
# What a version may hold of the sections agents.versions knows (their snapshots' shape).
MEMORY_DEFINITION = record(_fields(MemoryBlock, ("label", "limit", "description")))
VERSION_SECTIONS = record({"memory_blocks": list_of(MEMORY_DEFINITION, max_items=1000)},
                          optional=["memory_blocks"])  # fmt: skip
AGENT_VERSION = record({
    **_fields(AgentVersion, ("number", "name", "system_prompt", "model", "params",
                             "busy_policy", "restored_from", "created_at")),
    "tools": list_of(TOOL_SNAPSHOT, max_items=1000),
    "sections": VERSION_SECTIONS,
})  # fmt: skip
AGENT = record({"id": uuid_text, **_fields(Agent, AGENT_FIELDS[1:]),
                "versions": list_of(AGENT_VERSION, max_items=100_000)})  # fmt: skip


def _agents_check(rows: Rows, files: dict[str, Rows]) -> None:
    agents = {r["id"] for r in rows}
    for i, row in enumerate(rows):
        where = f"agents.jsonl line {i + 1}"
        unique(row["versions"], ("number",), f"{where}: versions")
        for version in row["versions"]:
            for tool in version["tools"]:
                target = tool.get("target_agent_id")
                if target is not None and target not in agents:
                    fail(where, "a version's tool names an agent not in the archive")


def _versions_of(files: dict[str, Rows]) -> set[str]:
    return {f"{a['id']}:{v['number']}" for a in files.get("agents.jsonl", [])
            for v in a["versions"]}  # fmt: skip


def _pinned_check(section: str) -> Callable[[Rows, dict[str, Rows]], None]:
    """Sessions and runs name their agent's version by number: one of the archive's."""

    def check(rows: Rows, files: dict[str, Rows]) -> None:
        versions = _versions_of(files)
        for i, row in enumerate(rows):
            number = row["agent_version"]
            if number is not None and f"{row['agent_id']}:{number}" not in versions:
                fail(f"{section}.jsonl line {i + 1}", "agent_version: not a version in the archive")

    return check


archive_section_register(
    "agents", dump=_dump_agents, load=_load_agents, schema=AGENT, unique=(("id",), ("name",)),
    check=_agents_check,
)  # fmt: skip
archive_section_register(
    "tools", dump=_dump_tools, load=_load_tools,
    schema=record({"agent_id": uuid_text, "target_agent_id": nullable(uuid_text),
                   **_fields(Tool, TOOL_FIELDS)}),
    refs={"agent_id": "agents", "target_agent_id": "agents"}, unique=(("agent_id", "name"),),
)  # fmt: skip
archive_section_register(
    "secrets", dump=_dump_secrets, load=_load_secrets,
    schema=record(_fields(ProjectSecret, ("name",))), unique=(("name",),),
)  # fmt: skip
archive_section_register(
    "sessions", dump=_dump_sessions, load=_load_sessions,
    schema=record({"id": uuid_text, "agent_id": uuid_text, "title": of_field(ChatSession, "title"),
                   "agent_version": nullable(integer(min_value=1)),
                   "created_at": of_field(ChatSession, "created_at")}),
    refs={"agent_id": "agents"}, unique=(("id",),), check=_pinned_check("sessions"),
)  # fmt: skip
archive_section_register(
    "messages", dump=_dump_messages, load=_load_messages,
    schema=record({"id": integer(min_value=1), "session_id": uuid_text,
                   **_fields(Message, (*MESSAGE_FIELDS, "created_at"))}),
    refs={"session_id": "sessions"}, unique=(("id",),),
)  # fmt: skip
archive_section_register(
    "runs", dump=_dump_runs, load=_load_runs,
    schema=record({"id": uuid_text, "session_id": uuid_text, "message_id": integer(min_value=1),
                   "agent_id": uuid_text, "parent_id": nullable(uuid_text),
                   "agent_version": nullable(integer(min_value=1)),
                   **_fields(Run, (*RUN_FIELDS, *RUN_TIMES))}),
    refs={"session_id": "sessions", "message_id": "messages", "agent_id": "agents",
          "parent_id": "runs"},
    unique=(("id",), ("message_id",)), check=_pinned_check("runs"),
)  # fmt: skip
archive_section_register(
    "usage", dump=_dump_usage, load=_load_usage,
    # Usage may name agents deleted since (their totals stay): not a reference.
    schema=record({"day": of_field(UsageDaily, "day"), "agent_id": nullable(uuid_text),
                   **_fields(UsageDaily, ("model", *USAGE_SUMS))}),
    unique=(("day", "agent_id", "model"),),
)  # fmt: skip


# --- Memory blocks, webhooks, schedules -----------------------------------------------------

MEMORY_FIELDS = ("label", "value", "limit", "description", "created_at")


def _dump_memory_blocks(project: Project) -> Iterator[dict[str, Any]]:
    blocks = MemoryBlock.objects.filter(agent__project=project)
    for block in blocks.order_by("agent__created_at", "agent_id", "created_at", "label"):
        yield _row({"agent_id": block.agent_id, **{f: getattr(block, f) for f in MEMORY_FIELDS}})


def _load_memory_blocks(ctx: ImportContext, rows: Rows) -> int:
    """The blocks with their values as they were (their audit trail stays behind)."""
    made = [MemoryBlock(agent_id=ctx.map("agent", r["agent_id"]),
                        **{f: r[f] for f in MEMORY_FIELDS[:-1]}) for r in rows]  # fmt: skip
    MemoryBlock.objects.bulk_create(made, batch_size=1000)
    _keep_times(MemoryBlock, made, rows, ("created_at",))
    return len(made)


# An import's note: the webhooks whose new secrets its first read shows.
SECRETS_UNSHOWN = "webhook_secrets_unshown"
WEBHOOK_FIELDS = ("url", "events", "description", "enabled", "created_at")


def _dump_webhooks(project: Project) -> Iterator[dict[str, Any]]:
    for endpoint in WebhookEndpoint.objects.filter(project=project).order_by("created_at", "id"):
        # Never the secret: an import makes a new one.
        yield _row({"id": endpoint.id, **{f: getattr(endpoint, f) for f in WEBHOOK_FIELDS}})


def _load_webhooks(ctx: ImportContext, rows: Rows) -> int:
    """Endpoints with new secrets, switched off: their receivers know only the old
    secret. The import's first read shows the new ones (`webhook_secrets`), once."""
    made = [WebhookEndpoint(project=ctx.project, url=r["url"], events=sorted(set(r["events"])),
                            description=r["description"], enabled=False, secret=secret_new())
            for r in rows]  # fmt: skip
    WebhookEndpoint.objects.bulk_create(made, batch_size=1000)
    _keep_times(WebhookEndpoint, made, rows, ("created_at",))
    ctx.notes[SECRETS_UNSHOWN] = [str(e.id) for e in made]
    ctx.notes.setdefault("switched_off", {})["webhooks"] = sum(r["enabled"] for r in rows)
    return len(made)


SCHEDULE_FIELDS = ("name", "content", "kind", "run_at", "cron", "timezone", "enabled",
                   "created_at")  # fmt: skip


def _dump_schedules(project: Project) -> Iterator[dict[str, Any]]:
    for schedule in Schedule.objects.filter(project=project).order_by("created_at", "id"):
        yield _row({"id": schedule.id, "agent_id": schedule.agent_id,
                    "session_id": schedule.session_id,
                    **{f: getattr(schedule, f) for f in SCHEDULE_FIELDS}})  # fmt: skip


def _load_schedules(ctx: ImportContext, rows: Rows) -> int:
    """Schedules come back switched off: the project they were exported from may still
    fire them, and a copy must not send every message (and spend on the provider) twice;
    switching one on (PATCH `enabled`) gives it to beat."""
    made = [Schedule(project=ctx.project, agent_id=ctx.map("agent", r["agent_id"]),
                     session_id=ctx.map("session", r["session_id"]), name=r["name"],
                     content=r["content"], kind=r["kind"], run_at=_when(r["run_at"]),
                     cron=r["cron"], timezone=r["timezone"], enabled=False)
            for r in rows]  # fmt: skip
    Schedule.objects.bulk_create(made, batch_size=1000)
    _keep_times(Schedule, made, rows, ("created_at",))
    ctx.notes.setdefault("switched_off", {})["schedules"] = sum(r["enabled"] for r in rows)
    return len(made)


def _schedules_check(rows: Rows, files: dict[str, Rows]) -> None:
    session_agent = {r["id"]: r["agent_id"] for r in files.get("sessions.jsonl", [])}
    for i, row in enumerate(rows):
        where = f"schedules.jsonl line {i + 1}"
        if session_agent.get(row["session_id"]) != row["agent_id"]:
            fail(where, "session_id: a session of another agent")
        try:
            timing_valid(kind=row["kind"], run_at=_when(row["run_at"]), cron=row["cron"],
                         timezone_name=row["timezone"], check_future=False)  # fmt: skip
        except ScheduleInvalid as exc:
            fail(f"{where}: {exc.field}", str(exc))


archive_section_register(
    "memory_blocks", dump=_dump_memory_blocks, load=_load_memory_blocks,
    schema=record({"agent_id": uuid_text, **_fields(MemoryBlock, MEMORY_FIELDS)}),
    refs={"agent_id": "agents"}, unique=(("agent_id", "label"),),
)  # fmt: skip
archive_section_register(
    "webhooks", dump=_dump_webhooks, load=_load_webhooks,
    schema=record({"id": uuid_text, **_fields(WebhookEndpoint, WEBHOOK_FIELDS),
                   "events": list_of(choice(EVENT_TYPES), max_items=len(EVENT_TYPES))}),
    unique=(("id",),),
)  # fmt: skip
archive_section_register(
    "schedules", dump=_dump_schedules, load=_load_schedules,
    schema=record({"id": uuid_text, "agent_id": uuid_text, "session_id": uuid_text,
                   **_fields(Schedule, SCHEDULE_FIELDS)}),
    refs={"agent_id": "agents", "session_id": "sessions"}, unique=(("id",),),
    check=_schedules_check,
)  # fmt: skip


# --- Checking an archive ---------------------------------------------------------------------

MANIFEST_SCHEMA = record({
    "format": string(64), "version": integer(min_value=1), "exported_at": string(64),
    "project": record(_fields(Project, ("name", "description"))),
    "sections": list_of(string(64), max_items=100), "counts": json_object,
})  # fmt: skip
CONTEXT_DOCUMENT = record({"text": string(MAX_CONTEXT_TEXT), "metadata": json_object})


def archive_validate(manifest: Any, files: dict[str, Rows]) -> None:
    """Raise ArchiveInvalid unless the archive is one this deployment can import whole:
    its format and version, each listed section's file and count, every record's schema,
    unique keys, and references that stay inside the archive."""
    _manifest_check(manifest, files)
    ids = _records_check(files)
    _references_check(files, ids)
    _context_check(files, ids, counts=manifest["counts"])


def _manifest_check(manifest: Any, files: dict[str, Rows]) -> None:
    """The manifest's shape, format and version; its sections known, each once, each
    with its file holding as many records as it says, and no file of another section."""
    MANIFEST_SCHEMA(manifest, "manifest.json")
    if manifest["format"] != FORMAT or manifest["version"] != VERSION:
        fail("manifest.json", f"not a {FORMAT} of version {VERSION}")
    listed = manifest["sections"]
    unknown = [name for name in listed if name not in _SECTIONS]
    if unknown or len(set(listed)) != len(listed):
        fail("manifest.json: sections", f"unknown or repeated: {', '.join(unknown) or listed}")
    counts = manifest["counts"]
    for name in files:
        if not name.startswith("context/") and name[: -len(".jsonl")] not in listed:
            fail(name, "a section the manifest does not list")
    for name in listed:
        if f"{name}.jsonl" not in files:
            fail("", f"no {name}.jsonl (the manifest lists it)")
        if name in counts and counts[name] != len(files[f"{name}.jsonl"]):
            fail(f"{name}.jsonl", "holds another number of records than the manifest says")


def _records_check(files: dict[str, Rows]) -> dict[str, set[str]]:
    """Every record to its section's schema and unique keys; the ids of each section."""
    ids: dict[str, set[str]] = {}
    for section in _SECTIONS.values():
        rows = files.get(f"{section.name}.jsonl", [])
        for i, row in enumerate(rows):
            section.schema(row, f"{section.name}.jsonl line {i + 1}")
        for fields in section.unique:
            unique(rows, fields, f"{section.name}.jsonl")
        ids[section.name] = {str(r["id"]) for r in rows if "id" in r}
    return ids


def _references_check(files: dict[str, Rows], ids: dict[str, set[str]]) -> None:
    """Every reference names a record of the archive; then each section's own check."""
    for section in _SECTIONS.values():
        rows = files.get(f"{section.name}.jsonl", [])
        for name, target in section.refs.items():
            for i, row in enumerate(rows):
                value = row.get(name)
                if value is not None and str(value) not in ids.get(target, ()):
                    fail(f"{section.name}.jsonl line {i + 1}: {name}",
                         f"names no record of {target}.jsonl")  # fmt: skip
        if section.check is not None:
            section.check(rows, files)


def _context_check(files: dict[str, Rows], ids: dict[str, set[str]], *, counts: dict) -> None:
    """Each context file belongs to an agent of the archive and holds documents only;
    as many in all as the manifest says."""
    context = 0
    for name, documents in files.items():
        if not name.startswith("context/"):
            continue
        if name[len("context/") : -len(".jsonl")] not in ids["agents"]:
            fail(name, "the context of an agent not in the archive")
        for i, document in enumerate(documents):
            CONTEXT_DOCUMENT(document, f"{name} line {i + 1}")
        context += len(documents)
    if "context" in counts and counts["context"] != context:
        fail("context/", "holds another number of documents than the manifest says")


# --- Export -------------------------------------------------------------------------------


@transaction.atomic
def export_start(*, project: Project, owner) -> ArchiveJob:
    project_lock_for_write(project_id=project.id)  # a 404 if a delete came first
    job = ArchiveJob.objects.create(kind=ArchiveJob.Kind.EXPORT, owner=owner, project=project)
    # A publish that fails after the commit leaves the job owed: lifecycle.recovery
    # sends it.
    on_commit_robust(lambda: archive_job_send(job), name=f"export_project(job={job.id})")
    return job


def archive_job_send(job: ArchiveJob) -> None:
    """Put the job's task (its current attempt) on the bus: an export on its project's
    queue (the worker that runs it holds the vector store, for the context), an import
    on the maintenance queue."""
    kwargs = {"job_id": str(job.id), "attempt": job.attempt}
    if job.kind == ArchiveJob.Kind.EXPORT:
        publish(current_app.tasks[EXPORT_TASK], project_id=job.project_id, kwargs=kwargs)
    else:
        current_app.send_task(IMPORT_TASK, kwargs=kwargs)


def _start(job: ArchiveJob, worker: str) -> bool:
    """Mark the job running on `worker`, unless the pass sent it again meanwhile."""
    started = ArchiveJob.objects.filter(id=job.id, attempt=job.attempt).exclude(status__in=ENDED)
    return bool(started.update(status=ArchiveJob.Status.RUNNING, worker=worker))


def _owed(job: ArchiveJob | None, attempt: int | None) -> bool:
    """Whether a task of this attempt still has the job to do: not ended, and not a
    sending the recovery pass has replaced (a task of the previous release carries no
    attempt: the first)."""
    return job is not None and job.status not in ENDED and job.attempt == (attempt or 1)


def _write_lines(archive: zipfile.ZipFile, name: str, rows: Iterable[dict[str, Any]]) -> int:
    count = 0
    with archive.open(name, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False, separators=(",", ":")).encode())
            handle.write(b"\n")
            count += 1
    return count


def _finish(job: ArchiveJob, started: float, **fields: Any) -> None:
    """End the job, unless the recovery pass sent it again meanwhile (the worker that
    runs this attempt was only late: the newer attempt's end is the job's)."""
    ArchiveJob.objects.filter(id=job.id, attempt=job.attempt).update(
        seconds=time.monotonic() - started, finished_at=timezone.now(), **fields
    )


def export_run(
    *, job_id: uuid.UUID | str, attempt: int | None = None, worker: str = ""
) -> ArchiveJob | None:
    """Write the job's archive (on a worker, `worker`: context comes from the vector
    store)."""
    job = ArchiveJob.objects.select_related("project").filter(id=job_id).first()
    if not _owed(job, attempt) or job.project is None:
        return job  # gone with its project, ended, or sent again
    started = time.monotonic()
    if not _start(job, worker):
        return job
    project = job.project
    path = archive_path(job)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Its own file per attempt: one whose worker was only late may still be writing.
    partial = path.with_suffix(f".{job.attempt}.part")
    try:
        counts: dict[str, int] = {}
        with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for section in _SECTIONS.values():
                counts[section.name] = _write_lines(
                    archive, f"{section.name}.jsonl", section.dump(project)
                )
            chunks = 0
            for agent_id in Agent.objects.filter(project=project).values_list("id", flat=True):
                documents = context_documents(
                    user_id=project.owner_id, project_id=project.id, agent_id=str(agent_id)
                )
                chunks += _write_lines(archive, f"context/{agent_id}.jsonl", documents)
            counts["context"] = chunks
            manifest = {"format": FORMAT, "version": VERSION, "exported_at": _json(timezone.now()),
                        "project": {"name": project.name, "description": project.description},
                        "sections": list(_SECTIONS), "counts": counts}  # fmt: skip
            archive.writestr("manifest.json", json.dumps(manifest, indent=1))
        partial.replace(path)
        for other in path.parent.glob(f"{job.id.hex}.*.part"):  # of attempts that died
            other.unlink(missing_ok=True)
    except Exception:
        # The task's failure gives the job back, and the recovery pass sends it again.
        partial.unlink(missing_ok=True)
        raise
    _finish(job, started, status=ArchiveJob.Status.DONE, counts=counts,
            size_bytes=path.stat().st_size)  # fmt: skip
    return ArchiveJob.objects.get(id=job.id)


def archive_read(source: str | Path | IO[bytes]) -> tuple[dict[str, Any], dict[str, Rows]]:
    """(manifest, {file name: its records}) of an archive, checked whole (ArchiveInvalid:
    what is wrong; nothing has been written)."""
    manifest, files = archive_open(source)
    archive_validate(manifest, files)
    return manifest, files


def uploads_dir() -> Path:
    return Path(settings.VAR_DIR) / "imports"


def upload_path(job: ArchiveJob) -> Path:
    """Where an uploaded archive waits for its import (removed once it ran)."""
    return uploads_dir() / f"{job.id.hex}.zip"


def archive_job_files_remove(job: ArchiveJob) -> None:
    """What a job given up leaves on disk: an import's upload, an export's partial
    archives (one per attempt)."""
    if job.kind == ArchiveJob.Kind.IMPORT:
        upload_path(job).unlink(missing_ok=True)
    elif job.project_id:
        for partial in exports_dir(job.project_id).glob(f"{job.id.hex}.*.part"):
            partial.unlink(missing_ok=True)


# --- Import -------------------------------------------------------------------------------


@transaction.atomic
def import_start(
    *, owner, source: ArchiveJob | None = None, upload: IO[bytes] | None = None
) -> ArchiveJob:
    """An import of an export of the owner's (`source`), or of an uploaded archive the
    caller has checked with `archive_read` (`upload`: kept until the import ran)."""
    job = ArchiveJob.objects.create(kind=ArchiveJob.Kind.IMPORT, owner=owner, source=source)
    if upload is not None:
        path = upload_path(job)
        path.parent.mkdir(parents=True, exist_ok=True)
        upload.seek(0)
        with path.open("wb") as handle:
            shutil.copyfileobj(upload, handle)
    on_commit_robust(lambda: archive_job_send(job), name=f"import_project(job={job.id})")
    return job


def import_run(
    *, job_id: uuid.UUID | str, attempt: int | None = None, worker: str = ""
) -> ArchiveJob | None:
    """Recreate the source archive's project under the job's owner: new ids, everything
    of every section, then the context queued for embedding with this deployment's model.
    Run again after its worker died or its task failed, it goes on: the records are made
    once (their transaction names the project on the job), and the context is queued
    again whole (its points are keyed by their text: the same documents store the same
    points)."""
    job = ArchiveJob.objects.select_related("source", "owner").filter(id=job_id).first()
    if not _owed(job, attempt):
        return job
    started = time.monotonic()
    if not _start(job, worker):
        return job
    uploaded = upload_path(job)
    if job.source is not None and job.source.project_id is not None:
        path = archive_path(job.source)
    elif job.source is None and uploaded.exists():
        path = uploaded
    else:
        _finish(job, started, status=ArchiveJob.Status.ERROR, error="the archive is gone")
        return job
    # Any other failure (the database, Redis, the broker down) fails the task, which gives
    # the job back: the recovery pass sends it again, and the records are made once (one
    # transaction).
    try:
        manifest, files = archive_read(path)
    except ArchiveInvalid as exc:
        uploaded.unlink(missing_ok=True)
        _finish(job, started, status=ArchiveJob.Status.ERROR, error=str(exc))
        return job
    if job.project_id is None and not _import_records(job, manifest, files):
        return job  # a newer sending of the job made them
    job.refresh_from_db(fields=["project", "counts"])
    try:
        context_jobs, chunks = _import_context(job, files)
    except ProjectGone:
        return job  # its project is being deleted, and the job goes with it
    uploaded.unlink(missing_ok=True)
    _finish(job, started, status=ArchiveJob.Status.DONE,
            counts={**job.counts, "context": chunks, "context_jobs": context_jobs})  # fmt: skip
    return ArchiveJob.objects.get(id=job.id)


def _import_records(job: ArchiveJob, manifest: dict[str, Any], files: dict[str, Rows]) -> bool:
    """Every section's records in a new project of the job's owner, in one transaction
    that names the project on the job, with what was made (`counts`); False when another
    sending of the job has replaced this one, or made them already."""
    with transaction.atomic():
        owed = ArchiveJob.objects.select_for_update().filter(
            id=job.id, attempt=job.attempt, project__isnull=True
        )
        if not owed.exists():
            return False
        project = Project.objects.create(
            owner=job.owner,
            name=manifest["project"]["name"],
            description=manifest["project"]["description"],
        )
        ctx = ImportContext(project=project)
        counts = {}
        for section in _SECTIONS.values():
            counts[section.name] = section.load(ctx, files.get(f"{section.name}.jsonl", []))
        owed.update(project=project, counts={**counts, **ctx.notes})
    return True


def _import_context(job: ArchiveJob, files: dict[str, Rows]) -> tuple[list[str], int]:
    """Queue each agent's context documents for the imported project's agent of the same
    name (names are unique in a project); (the context jobs' ids, how many documents)."""
    names = {str(row["id"]): row["name"] for row in files.get("agents.jsonl", [])}
    made = Agent.objects.select_related("project").filter(project=job.project)
    agents = {agent.name: agent for agent in made}
    context_jobs, chunks = [], 0
    for name, documents in files.items():
        if not name.startswith("context/") or not documents:
            continue
        agent = agents[names[name[len("context/") : -len(".jsonl")]]]
        for i in range(0, len(documents), IMPORT_CONTEXT_JOB_DOCUMENTS):
            batch = documents[i : i + IMPORT_CONTEXT_JOB_DOCUMENTS]
            context_jobs.append(context_documents_add(agent=agent, documents=batch))
            chunks += len(batch)
    return context_jobs, chunks


def import_webhook_secrets_take(*, job: ArchiveJob) -> dict[str, str]:
    """The secrets of the webhooks a finished import made, by endpoint id: once (the
    first read after it is done), like a new endpoint's. The job keeps only their ids
    until then; the secrets themselves stay encrypted on the endpoints."""
    if job.status != ArchiveJob.Status.DONE or not job.counts.get(SECRETS_UNSHOWN):
        return {}
    with transaction.atomic():
        locked = ArchiveJob.objects.select_for_update().filter(id=job.id).first()
        ids = (locked.counts.get(SECRETS_UNSHOWN) or []) if locked else []
        if not ids:
            return {}
        locked.counts = {**locked.counts, SECRETS_UNSHOWN: []}
        locked.save(update_fields=["counts"])
        job.counts = locked.counts
        endpoints = WebhookEndpoint.objects.filter(id__in=ids, project_id=locked.project_id)
        return {str(e.id): e.secret for e in endpoints}
