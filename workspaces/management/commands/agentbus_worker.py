"""Start (or print) a dedicated AgentBus worker for one project.

    python manage.py agentbus_worker --project <uuid> [--concurrency N] [--print] [-- CELERY ARGS]

It runs `celery -A config worker -Q uws.project.<hex> --agentbus-mode dedicated`, named
`project-<hex>@<host>`. A dedicated worker consumes that project's queue only: it
ignores the active set and the follow/unfollow broadcasts of the shared pool (which
still serves the project too while it is active; the dedicated worker adds capacity).
SIGTERM starts Celery's soft shutdown (REMAP_SIGTERM=SIGQUIT): running tasks get
CELERY_WORKER_SOFT_SHUTDOWN_TIMEOUT seconds, then go back to the queue.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
import uuid

from django.core.management.base import BaseCommand, CommandError

from agentbus import project_queue
from projects.models import Project


def dedicated_worker_argv(
    project_id: uuid.UUID | str, *, concurrency: int = 1, extra: list[str] | None = None
) -> list[str]:
    """The command line of a dedicated worker for one project."""
    queue = project_queue(project_id)
    celery = shutil.which("celery") or os.path.join(os.path.dirname(sys.executable), "celery")
    return [
        celery,
        "-A",
        "config",
        "worker",
        "-Q",
        queue,
        "--agentbus-mode",
        "dedicated",
        "-n",
        f"project-{uuid.UUID(str(project_id)).hex}@%h",
        f"--concurrency={concurrency}",
        "--loglevel=INFO",
        *(extra or []),
    ]


class Command(BaseCommand):
    help = "Start a Celery worker that serves one project's AgentBus queue."

    def add_arguments(self, parser):
        parser.add_argument("--project", required=True, help="the project's id (UUID)")
        parser.add_argument("--concurrency", type=int, default=1)
        parser.add_argument(
            "--print", action="store_true", help="print the command instead of running it"
        )
        parser.add_argument("celery_args", nargs="*", help="more `celery worker` options")

    def handle(self, *args, **options):
        try:
            project_id = uuid.UUID(options["project"])
        except ValueError as exc:
            raise CommandError(f"not a project id: {options['project']!r}") from exc
        if options["concurrency"] < 1:
            raise CommandError("--concurrency must be at least 1")
        if not Project.objects.filter(id=project_id).exists():
            raise CommandError(f"no project {project_id}")
        argv = dedicated_worker_argv(
            project_id, concurrency=options["concurrency"], extra=options["celery_args"]
        )
        if options["print"]:
            self.stdout.write(shlex.join(argv))
            return
        env = dict(os.environ, REMAP_SIGTERM="SIGQUIT")
        sys.stdout.flush()
        os.execvpe(argv[0], argv, env)
