"""A user's data goes with the user.

`user_delete` is the one service that deletes a user (the self-service API, the admin):
each project is deleted exactly as `project_delete` deletes one (its row locked against
writes in flight; its teardown recorded durably and run after commit: queue, Redis keys,
event streams, vector points), the user's browser sessions go, then the user row, whose
cascade takes API tokens, quotas and the admin's log entries. Governance's receiver
folds the user's usage into anonymised daily totals and anonymises their audit trail in
the same transaction (governance.receivers).

What must wait for the teardowns is the erasure (`account_erasure_finish`): an outbox
row committed with the delete, finished by a task once every teardown is done (the
teardown records are anonymised, the user's own quota counters and rate limits in Redis
removed) and then deleted itself. Deleting a user any other way (the shell) also leaves
the outbox row (the post_delete receiver below), so the erasure is never lost.
"""

from __future__ import annotations

import logging

from celery import current_app
from django.contrib.auth import get_user_model
from django.contrib.sessions.models import Session
from django.db import transaction
from django.db.models.signals import post_delete, pre_delete
from django.dispatch import receiver
from django.http import Http404
from django.utils import timezone

from common.services import on_commit_robust
from context.vectors import context_vacuum
from governance.receivers import user_counters_delete
from projects.models import Project
from projects.services import project_delete
from workspaces.models import WorkspaceTeardown

from .models import AccountErasure

logger = logging.getLogger(__name__)

ERASE_TASK = "lifecycle.erase_account"
# What a teardown record says of its owner once the owner is erased.
ERASED_OWNER = 0


@transaction.atomic
def user_delete(*, user) -> None:
    """Delete `user` and everything of theirs (module docstring)."""
    User = get_user_model()
    if User.objects.select_for_update().filter(pk=user.pk).first() is None:
        raise Http404("No such user.")  # deleted meanwhile
    for project in Project.objects.filter(owner_id=user.pk).order_by("id"):
        project_delete(project=project)
    user.delete()


def user_sessions_delete(*, user_id: int) -> int:
    """Delete the user's browser sessions (the admin's, the API's session auth). Sessions
    store the user id inside their signed data, so each live one is decoded."""
    ids = [
        session.session_key
        for session in Session.objects.filter(expire_date__gt=timezone.now()).iterator()
        if str(session.get_decoded().get("_auth_user_id")) == str(user_id)
    ]
    return Session.objects.filter(session_key__in=ids).delete()[0]


@receiver(pre_delete, sender="auth.User", dispatch_uid="lifecycle.user_sessions")
def _sessions_on_user_delete(sender, instance, **kwargs) -> None:
    user_sessions_delete(user_id=instance.pk)


@receiver(post_delete, sender="auth.User", dispatch_uid="lifecycle.user_erasure")
def _erasure_on_user_delete(sender, instance, **kwargs) -> None:
    # In the deleting transaction (the outbox); the task goes after commit.
    user_id = instance.pk
    AccountErasure.objects.get_or_create(user_id=user_id)
    on_commit_robust(
        lambda: account_erasure_dispatch(user_id=user_id), name=f"erase_account(user={user_id})"
    )


def account_erasure_dispatch(*, user_id: int, countdown: float = 0) -> None:
    # By name: the task module (lifecycle.tasks) imports this one.
    current_app.send_task(ERASE_TASK, kwargs={"user_id": user_id}, countdown=countdown)


def account_erasure_finish(*, user_id: int) -> bool:
    """Finish a deleted user's erasure once their projects' teardowns are done: their
    teardown records keep no owner, their counters in Redis go, the outbox row goes.
    Returns False while a teardown is still owed (the caller tries again later)."""
    erasure = AccountErasure.objects.filter(user_id=user_id).first()
    if erasure is None:
        return True  # done already
    teardowns = WorkspaceTeardown.objects.filter(user_id=user_id)
    if teardowns.exclude(status=WorkspaceTeardown.Status.DONE).exists():
        AccountErasure.objects.filter(id=erasure.id).update(attempts=erasure.attempts + 1)
        return False
    user_counters_delete(user_id=user_id)
    # Their points were deleted by the teardowns; the embedded store keeps deleted points
    # on disk until it is optimised: now, not at the next collections sweep.
    context_vacuum()
    with transaction.atomic():
        teardowns.update(user_id=ERASED_OWNER)
        erasure.delete()
    logger.info("user %s erased", user_id)
    return True


def account_erasures_owed() -> list[int]:
    """Erasures not finished (the retention sweep dispatches them again)."""
    return list(AccountErasure.objects.values_list("user_id", flat=True))
