"""`manage.py vectors_migrate --to shared|per_agent`: move agents' context between the
vector layouts without losing a point (see context.vector_moves)."""

from __future__ import annotations

import uuid

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from context.vector_moves import layout_migrate


class Command(BaseCommand):
    help = (
        "Move agents' vector context into the shared layout (one collection per embedding "
        "model) or the per-agent layout (one collection per agent). Resumable and "
        "idempotent: run it again after an interruption. In Qdrant local mode the storage "
        "folder serves one process: stop the workers first. Then set VECTOR_LAYOUT to the "
        "same layout and run it once more for anything written meanwhile."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument("--to", required=True, choices=["shared", "per_agent"])
        parser.add_argument("--project", type=uuid.UUID, help="only this project's agents")
        parser.add_argument(
            "--model",
            help="the embedding model that made the per-agent vectors (default: the "
            "configured one); names the shared collection they go to",
        )
        parser.add_argument("--batch", type=int, default=None, help="points per step")

    def handle(self, *args, to: str, project=None, model=None, batch=None, **options) -> None:
        batch = settings.VECTOR_MOVE_BATCH if batch is None else batch
        if batch < 1:
            raise CommandError("--batch must be at least 1")
        try:
            report = layout_migrate(
                to=to, batch=batch, project_id=project, model=model, progress=self.stdout.write
            )
        except RuntimeError as exc:
            raise CommandError(str(exc)) from exc
        for line in report.skipped:
            self.stderr.write(f"skipped: {line}")
        self.stdout.write(
            self.style.SUCCESS(
                f"moved {report.points} points of {report.agents} agents to the {to} layout"
            )
        )
        if report.skipped:
            raise CommandError(f"{len(report.skipped)} agents' context could not be moved")
