"""How the lifecycle follows a project's deletion: its archives go with it."""

from __future__ import annotations

from django.db import transaction
from django.dispatch import receiver

from projects.signals import project_deleted

from .exports import exports_delete


@receiver(project_deleted, dispatch_uid="lifecycle.exports_on_project_deleted")
def delete_archives(sender, *, project_id, **kwargs) -> None:
    # After commit: a rolled-back delete keeps its files (the job rows cascade anyway).
    transaction.on_commit(lambda: exports_delete(project_id=project_id), robust=True)
