"""Every path that deletes a project row announces it once (`project_deleted`)."""

from __future__ import annotations

from django.db.models.signals import post_delete
from django.dispatch import receiver

from .models import Project
from .signals import project_deleted


@receiver(post_delete, sender=Project, dispatch_uid="projects.announce_deletion")
def announce_deletion(sender, instance: Project, **kwargs) -> None:
    # A model signal, not only the service's: deleting a user cascades to its projects,
    # and the admin's bulk delete and the shell bypass the service. Connecting it also
    # keeps Django from "fast-deleting" projects without sending it.
    project_deleted.send(sender=Project, project_id=instance.id, user_id=instance.owner_id)
