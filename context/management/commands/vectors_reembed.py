"""`manage.py vectors_reembed`: after the embedding model changed, move agents' context
from the old model's shared collection into the new model's, embedding it again."""

from __future__ import annotations

import uuid

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from context.vector_moves import context_reembed


class Command(BaseCommand):
    help = (
        "Embed agents' context again with the configured embedding model, moving it from "
        "the shared collections of other models into the model's own (resumable: each "
        "step is written to the new collection before it leaves the old one). Searches "
        "read the configured model's collection, so an agent finds its older context once "
        "it has moved. In Qdrant local mode stop the workers first."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument("--project", type=uuid.UUID, help="only this project's agents")
        parser.add_argument("--agent", type=uuid.UUID, help="only this agent")
        parser.add_argument("--batch", type=int, default=None, help="points per step")

    def handle(self, *args, project=None, agent=None, batch=None, **options) -> None:
        batch = settings.VECTOR_MOVE_BATCH if batch is None else batch
        if batch < 1:
            raise CommandError("--batch must be at least 1")
        try:
            report = context_reembed(
                batch=batch, project_id=project, agent_id=agent, progress=self.stdout.write
            )
        except RuntimeError as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(
            self.style.SUCCESS(f"re-embedded {report.points} points of {report.agents} agents")
        )
