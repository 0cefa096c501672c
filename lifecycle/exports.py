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
from typing import Any

from celery import current_app
from django.conf import settings
from django.db import transaction
from django.db.models import Count, Q, Sum
from django.db.models.functions import Coalesce
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from agentbus import publish
from agents.models import Agent, AgentVersion, ProjectSecret, Tool
from chat.models import ChatSession, Message, Run
from common.services import on_commit_robust
from context.services import context_documents_add
from context.vectors import context_documents
from governance.models import RunUsage, UsageDaily
from projects.models import Project

from .models import ArchiveJob

FORMAT = "uws-project-archive"
VERSION = 1
EXPORT_TASK = "lifecycle.export_project"
IMPORT_TASK = "lifecycle.import_project"
# Documents per context job an import queues (each job is cut into short batches).
IMPORT_CONTEXT_JOB_DOCUMENTS = 500


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


@dataclass(frozen=True)
class ArchiveSection:
    name: str
    dump: Callable[[Project], Iterable[dict[str, Any]]]
    load: Callable[[ImportContext, list[dict[str, Any]]], int]


_SECTIONS: dict[str, ArchiveSection] = {}


def archive_section_register(
    name: str,
    *,
    dump: Callable[[Project], Iterable[dict[str, Any]]],
    load: Callable[[ImportContext, list[dict[str, Any]]], int],
) -> None:
    """Add a section (in load order: register after the sections it refers to)."""
    _SECTIONS[name] = ArchiveSection(name=name, dump=dump, load=load)


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


archive_section_register("agents", dump=_dump_agents, load=_load_agents)
archive_section_register("tools", dump=_dump_tools, load=_load_tools)
archive_section_register("secrets", dump=_dump_secrets, load=_load_secrets)
archive_section_register("sessions", dump=_dump_sessions, load=_load_sessions)
archive_section_register("messages", dump=_dump_messages, load=_load_messages)
archive_section_register("runs", dump=_dump_runs, load=_load_runs)
archive_section_register("usage", dump=_dump_usage, load=_load_usage)


# --- Export -------------------------------------------------------------------------------


@transaction.atomic
def export_start(*, project: Project, owner) -> ArchiveJob:
    job = ArchiveJob.objects.create(kind=ArchiveJob.Kind.EXPORT, owner=owner, project=project)
    # On the project's bus: the worker that runs it holds the vector store (context).
    transaction.on_commit(
        lambda: publish(
            current_app.tasks[EXPORT_TASK], project_id=project.id, kwargs={"job_id": str(job.id)}
        )  # fmt: skip
    )
    return job


def _write_lines(archive: zipfile.ZipFile, name: str, rows: Iterable[dict[str, Any]]) -> int:
    count = 0
    with archive.open(name, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False, separators=(",", ":")).encode())
            handle.write(b"\n")
            count += 1
    return count


def _finish(job: ArchiveJob, started: float, **fields: Any) -> None:
    ArchiveJob.objects.filter(id=job.id).update(
        seconds=time.monotonic() - started, finished_at=timezone.now(), **fields
    )


def export_run(*, job_id: uuid.UUID | str) -> ArchiveJob | None:
    """Write the job's archive (on a worker: context comes from the vector store)."""
    job = ArchiveJob.objects.select_related("project").filter(id=job_id).first()
    if job is None or job.project is None or job.status == ArchiveJob.Status.DONE:
        return job  # gone with its project, or done already
    started = time.monotonic()
    ArchiveJob.objects.filter(id=job.id).update(status=ArchiveJob.Status.RUNNING)
    project = job.project
    path = archive_path(job)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".part")
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
    except Exception as exc:
        partial.unlink(missing_ok=True)
        _finish(job, started, status=ArchiveJob.Status.ERROR, error=f"{type(exc).__name__}: {exc}")
        raise
    _finish(job, started, status=ArchiveJob.Status.DONE, counts=counts,
            size_bytes=path.stat().st_size)  # fmt: skip
    return ArchiveJob.objects.get(id=job.id)


def archive_read(path: Path) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """(manifest, {file name: its records}) of an archive."""
    files: dict[str, list[dict[str, Any]]] = {}
    with zipfile.ZipFile(path) as archive:
        manifest = json.loads(archive.read("manifest.json"))
        if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
            raise ValueError("not an archive of this format and version")
        for name in archive.namelist():
            if name.endswith(".jsonl"):
                files[name] = [json.loads(line) for line in archive.read(name).splitlines()]
    return manifest, files


# --- Import -------------------------------------------------------------------------------


@transaction.atomic
def import_start(*, owner, source: ArchiveJob) -> ArchiveJob:
    job = ArchiveJob.objects.create(kind=ArchiveJob.Kind.IMPORT, owner=owner, source=source)
    on_commit_robust(
        lambda: current_app.send_task(IMPORT_TASK, kwargs={"job_id": str(job.id)}),
        name=f"import_project(job={job.id})",
    )
    return job


def import_run(*, job_id: uuid.UUID | str) -> ArchiveJob | None:
    """Recreate the source archive's project under the job's owner: new ids, everything
    of every section, then the context queued for embedding with this deployment's model."""
    job = ArchiveJob.objects.select_related("source", "owner").filter(id=job_id).first()
    if job is None or job.status in (ArchiveJob.Status.DONE, ArchiveJob.Status.ERROR):
        return job
    started = time.monotonic()
    if job.source is None or job.source.project_id is None:
        _finish(job, started, status=ArchiveJob.Status.ERROR, error="the export is gone")
        return job
    manifest, files = archive_read(archive_path(job.source))
    with transaction.atomic():
        project = Project.objects.create(
            owner=job.owner,
            name=manifest["project"]["name"],
            description=manifest["project"]["description"],
        )
        ctx = ImportContext(project=project)
        counts = {}
        for section in _SECTIONS.values():
            counts[section.name] = section.load(ctx, files.get(f"{section.name}.jsonl", []))
        ArchiveJob.objects.filter(id=job.id).update(project=project)
    context_jobs, chunks = [], 0
    for name, documents in files.items():
        if not name.startswith("context/") or not documents:
            continue
        agent = Agent.objects.select_related("project").get(id=ctx.map("agent", name[8:-6]))
        for i in range(0, len(documents), IMPORT_CONTEXT_JOB_DOCUMENTS):
            batch = documents[i : i + IMPORT_CONTEXT_JOB_DOCUMENTS]
            context_jobs.append(context_documents_add(agent=agent, documents=batch))
            chunks += len(batch)
    counts["context"] = chunks
    _finish(job, started, status=ArchiveJob.Status.DONE,
            counts={**counts, **ctx.notes, "context_jobs": context_jobs})  # fmt: skip
    return ArchiveJob.objects.get(id=job.id)
