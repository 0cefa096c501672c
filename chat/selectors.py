"""Reads of sessions, messages and runs, always inside one (already scoped) project, and
what operators see of runs (health)."""

from __future__ import annotations

import uuid
from datetime import timedelta

from django.conf import settings
from django.db.models import Count, Q, QuerySet
from django.db.models.functions import Now
from django.utils import timezone

from common.selectors import get_or_404
from projects.models import Project

from .models import ChatSession, Message, Run


def session_list(*, project: Project) -> QuerySet[ChatSession]:
    return ChatSession.objects.filter(project=project).select_related("agent_version")


def session_get(*, project: Project, session_id: uuid.UUID | str) -> ChatSession:
    # With its agent: posting a message reads the agent's policy (one query, not two).
    session = get_or_404(session_list(project=project).select_related("agent"), id=session_id)
    session.project = project  # already loaded: spares a query to whoever follows it
    return session


def session_exists_in(*, projects: QuerySet[Project], session_id: uuid.UUID | str) -> bool:
    """Whether the session belongs to the one project in `projects` (a scoped project,
    not read yet: realtime.auth), in one query."""
    try:
        return ChatSession.objects.filter(id=session_id, project__in=projects).exists()
    except (ValueError, TypeError):
        return False


def session_get_with_project(
    *, projects: QuerySet[Project], project_id: uuid.UUID, session_id: uuid.UUID
) -> ChatSession | None:
    """The session of project `project_id`, one of `projects` (projects.selectors'
    project_list: the user's), with its project and agent, in one query; None when there
    is none, for the caller to tell which of the two is missing."""
    try:
        return ChatSession.objects.select_related("project", "agent").get(
            id=session_id, project_id=project_id, project__in=projects
        )
    except (ChatSession.DoesNotExist, ValueError, TypeError):
        return None


def message_list(*, session: ChatSession) -> QuerySet[Message]:
    return Message.objects.filter(session=session)


def run_list(*, session: ChatSession) -> QuerySet[Run]:
    return (
        Run.objects.filter(session=session)
        .select_related("agent_version")
        .order_by("-created_at", "-id")
    )


def run_get(*, session: ChatSession, run_id: uuid.UUID | str) -> Run:
    return get_or_404(run_list(session=session).select_related("session__project"), id=run_id)


def project_run_get(*, project: Project, run_id: uuid.UUID | str) -> Run:
    """A run of any session of `project` (another project's is a 404)."""
    return get_or_404(
        Run.objects.filter(session__project=project).select_related("session__project"),
        id=run_id,
    )


# How many projects health names per problem (the worst first): enough to act on, and
# the report stays small when a fault hits many projects at once.
RUN_HEALTH_PROJECTS = 20


def _run_problem_filters() -> tuple[Q, Q]:
    """(stuck, failed recently): a run the recovery pass has not got going, and one that
    ended in error within RUN_FAILURE_WINDOW."""
    now = timezone.now()
    stuck_queued = now - timedelta(seconds=3 * settings.RUN_REDISPATCH_SECONDS)
    recent = now - timedelta(seconds=settings.RUN_FAILURE_WINDOW_SECONDS)
    # A run resumed after a wait (chat.suspend) was created long ago: stuck only if its
    # dispatch is old too.
    queued_long = Q(status=Run.Status.QUEUED, created_at__lt=stuck_queued) & (
        Q(dispatched_at__isnull=True) | Q(dispatched_at__lt=stuck_queued)
    )
    # Running past its lease by another lease (the database's clock, as leases are).
    stuck_running = Now() - timedelta(seconds=settings.RUN_LEASE_SECONDS)
    stuck = queued_long | Q(status=Run.Status.RUNNING, lease_expires_at__lt=stuck_running)
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
