"""`manage.py context_sparse_reindex`: give context stored before hybrid retrieval its
sparse (BM25-like) vectors."""

from __future__ import annotations

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from context.vectorstore import get_vector_store


class Command(BaseCommand):
    help = (
        "Compute the sparse vector of every stored chunk whose collection was made before "
        "hybrid retrieval, in both layouts. Resumable and idempotent: interrupted, run it "
        "again. Qdrant Edge shards (the embedded shared layout) get the vector in place; "
        "qdrant-client collections (a server, local mode) are rebuilt through a side copy. "
        "Stop the workers first (in Qdrant local mode one process holds the folder)."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument("--batch", type=int, default=None, help="points per step")

    def handle(self, *args, batch=None, **options) -> None:
        batch = settings.VECTOR_MOVE_BATCH if batch is None else batch
        if batch < 1:
            raise CommandError("--batch must be at least 1")
        try:
            done = get_vector_store().sparse_reindex(batch=batch, progress=self.stdout.write)
        except RuntimeError as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(
            self.style.SUCCESS(
                f"{sum(done.values())} points of {len(done)} collections have sparse vectors"
            )
        )
