"""Reads of agents, sessions and messages, always inside one (already scoped) project."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
import uuid
from datetime import timedelta
from urllib.parse import urlsplit, urlunsplit

from django.conf import settings
from django.db.models import Count, Q, QuerySet
from django.http import Http404
from django.utils import timezone

from projects.models import Project
from workspaces.redis import scoped

from .models import Agent, ChatSession, Message, ProjectSecret, Run, Tool
from .runtime.providers import llm_configured
from .runtime.streams import job_get


def _get_or_404(queryset: QuerySet, **lookup):
    try:
        return queryset.get(**lookup)
    except (queryset.model.DoesNotExist, ValueError, TypeError):
        raise Http404(f"No such {queryset.model._meta.verbose_name}.") from None


def agent_list(*, project: Project) -> QuerySet[Agent]:
    return Agent.objects.filter(project=project)


def agent_get(*, project: Project, agent_id: uuid.UUID | str) -> Agent:
    return _get_or_404(agent_list(project=project), id=agent_id)


def session_list(*, project: Project) -> QuerySet[ChatSession]:
    return ChatSession.objects.filter(project=project)


def session_get(*, project: Project, session_id: uuid.UUID | str) -> ChatSession:
    # With its agent: posting a message reads the agent's policy (one query, not two).
    session = _get_or_404(session_list(project=project).select_related("agent"), id=session_id)
    session.project = project  # already loaded: spares a query to whoever follows it
    return session


def message_list(*, session: ChatSession) -> QuerySet[Message]:
    return Message.objects.filter(session=session)


def run_list(*, session: ChatSession) -> QuerySet[Run]:
    return Run.objects.filter(session=session).order_by("-created_at", "-id")


def run_get(*, session: ChatSession, run_id: uuid.UUID | str) -> Run:
    return _get_or_404(run_list(session=session).select_related("session__project"), id=run_id)


def tool_list(*, agent: Agent) -> QuerySet[Tool]:
    return Tool.objects.filter(agent=agent)


def tool_get(*, agent: Agent, tool_id: uuid.UUID | str) -> Tool:
    return _get_or_404(tool_list(agent=agent).select_related("agent"), id=tool_id)


def secret_list(*, project: Project) -> QuerySet[ProjectSecret]:
    return ProjectSecret.objects.filter(project=project)


def secret_get(*, project: Project, name: str) -> ProjectSecret:
    return _get_or_404(secret_list(project=project), name=name)


def agent_config(agent: Agent) -> dict:
    """An agent as the plain config the AgentCache holds."""
    return {
        "id": str(agent.id),
        "project_id": str(agent.project_id),
        "name": agent.name,
        "system_prompt": agent.system_prompt,
        "model": agent.model,
        "params": agent.params,
        "updated_at": agent.updated_at.isoformat(),
    }


def context_job_get(*, agent: Agent, job_id: uuid.UUID | str) -> dict | None:
    """A context job of this agent (status lives in workspace Redis for a day), or None."""
    project = agent.project
    job = job_get(redis=scoped(project.owner_id, project.id), job_id=job_id)
    if job is None or job.get("agent_id") != str(agent.id):
        return None
    return job


# How many projects health names per problem (the worst first): enough to act on, and
# the report stays small when a fault hits many projects at once.
RUN_HEALTH_PROJECTS = 20


def _run_problem_filters() -> tuple[Q, Q]:
    """(stuck, failed recently): a run the recovery pass has not got going, and one that
    ended in error within RUN_FAILURE_WINDOW."""
    now = timezone.now()
    stuck_queued = now - timedelta(seconds=3 * settings.RUN_REDISPATCH_SECONDS)
    stuck_running = now - timedelta(seconds=settings.RUN_LEASE_SECONDS)
    recent = now - timedelta(seconds=settings.RUN_FAILURE_WINDOW_SECONDS)
    stuck = Q(status=Run.Status.QUEUED, created_at__lt=stuck_queued) | Q(
        status=Run.Status.RUNNING, lease_expires_at__lt=stuck_running
    )
    return stuck, Q(status=Run.Status.ERROR, finished_at__gte=recent)


def _run_counts(runs: QuerySet[Run]) -> dict:
    stuck, failed = _run_problem_filters()
    return runs.aggregate(
        queued=Count("id", filter=Q(status=Run.Status.QUEUED)),
        running=Count("id", filter=Q(status=Run.Status.RUNNING)),
        stuck=Count("id", filter=stuck),
        failed_recently=Count("id", filter=failed),
    )


def _run_problems(counts: dict) -> list[str]:
    problems = []
    if counts["stuck"]:
        problems.append(f"{counts['stuck']} run(s) stuck")
    if counts["failed_recently"]:
        window = settings.RUN_FAILURE_WINDOW_SECONDS / 60
        problems.append(f"{counts['failed_recently']} run(s) failed in the last {window:g} min")
    return problems


def runs_health() -> dict:
    """What operators see of agent runs (health and stats): how many are queued and
    running, how many are stuck (the recovery pass has not got them going), and how many
    failed recently, with the projects they belong to named (`projects`, the most
    affected first). Unhealthy while any is stuck or failed in RUN_FAILURE_WINDOW; a
    problem of some projects, not of the deployment, so it never makes health 503."""
    counts = _run_counts(Run.objects.all())
    problems = _run_problems(counts)
    projects = []
    if problems:
        stuck, failed = _run_problem_filters()
        rows = (
            Run.objects.filter(stuck | failed)
            .values("agent__project_id", "agent__project__name", "agent__project__owner_id")
            .annotate(stuck=Count("id", filter=stuck), failed_recently=Count("id", filter=failed))
            .order_by("-stuck", "-failed_recently", "agent__project_id")[:RUN_HEALTH_PROJECTS]
        )
        projects = [
            {
                "project_id": str(row["agent__project_id"]),
                "project_name": row["agent__project__name"],
                "user_id": row["agent__project__owner_id"],
                "problems": _run_problems(row),
            }
            for row in rows
        ]
    return {"healthy": not problems, **counts, "problems": problems, "projects": projects}


def project_runs_health(project_id: uuid.UUID) -> dict:
    """`runs_health` for one project's runs (the per-project health route)."""
    counts = _run_counts(Run.objects.filter(agent__project_id=project_id))
    problems = _run_problems(counts)
    return {"healthy": not problems, **counts, "problems": problems}


OPENAI_DEFAULT_BASE_URL = "https://api.openai.com/v1"


def llm_endpoint() -> str | None:
    """The LLM endpoint agents answer through, safe to show (no credentials in it), or
    None for the offline provider."""
    if not llm_configured():
        return None
    parts = urlsplit(settings.OPENAI_BASE_URL or OPENAI_DEFAULT_BASE_URL)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


def llm_health() -> dict:
    """Which LLM endpoint agents answer through and whether it answers (health's `llm`):
    a GET of its /models with the configured key, which is never reported. Unhealthy
    when it cannot be reached or refuses the key."""
    endpoint = llm_endpoint()
    if endpoint is None:
        return {
            "healthy": True,
            "provider": "offline",
            "endpoint": None,
            "detail": "no OPENAI_BASE_URL or OPENAI_API_KEY: the offline provider answers",
        }
    report = {
        "provider": "openai",
        "endpoint": endpoint,
        "default_model": settings.LLM_DEFAULT_MODEL or None,
        "api_key_set": bool(settings.OPENAI_API_KEY),
    }
    if not settings.LLM_DEFAULT_MODEL:
        report["note"] = "LLM_DEFAULT_MODEL is unset: agents without a model cannot answer"
    base = (settings.OPENAI_BASE_URL or OPENAI_DEFAULT_BASE_URL).rstrip("/")
    probe = urllib.request.Request(f"{base}/models", method="GET")
    if settings.OPENAI_API_KEY:
        probe.add_header("Authorization", f"Bearer {settings.OPENAI_API_KEY}")
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(probe, timeout=settings.LLM_HEALTH_TIMEOUT_SECONDS) as r:
            status = r.status
    except urllib.error.HTTPError as exc:  # it answered, with an error status
        status = exc.code
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return {**report, "healthy": False, "reachable": False,
                "error": f"the LLM endpoint could not be reached: {reason}"}  # fmt: skip
    report.update(
        reachable=True,
        status_code=status,
        latency_ms=round((time.perf_counter() - started) * 1000, 2),
    )
    if status in (401, 403):
        return {**report, "healthy": False, "error": f"the LLM endpoint refused the key ({status})"}
    return {**report, "healthy": True}
