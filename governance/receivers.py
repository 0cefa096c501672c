"""How governance follows a project's teardown (its quota counters and rate-limit keys
go with it: they would otherwise stay up to COUNTER_TTL) and a user's deletion."""

from __future__ import annotations

import uuid

from django.conf import settings
from django.core.cache import cache
from django.db.models.signals import pre_delete
from django.dispatch import receiver
from rest_framework.settings import api_settings

from common.redis import get_redis
from workspaces.signals import workspace_teardown

from .audit import audit_anonymise_user
from .models import EmbeddingUsage, RunUsage
from .quotas import KEY_NAMESPACE
from .rollups import usage_rollup_all

ROLLUP_CHUNK = 5000


def project_counters_delete(*, project_id) -> int:
    """Delete the project's quota counters (`gov:p:<id>:*`) and its per-project rate
    limits; returns how many quota keys went."""
    project_id = uuid.UUID(str(project_id))  # as the counters and the URLs spell it
    client = get_redis()
    keys = list(client.scan_iter(match=f"{KEY_NAMESPACE}:p:{project_id}:*", count=1000))
    if keys:
        client.unlink(*keys)
    # Its rate limits, one per user that was counted (common.throttling), in the cache.
    limits = list(
        client.scan_iter(match=cache.make_key(f"throttle_*_project_{project_id}_*"), count=1000)
    )
    if limits:
        client.unlink(*limits)
    return len(keys)


def user_counters_delete(*, user_id: int) -> int:
    """Delete a deleted user's quota counters (`gov:u:<id>:*`) and per-user rate limits;
    returns how many quota keys went."""
    client = get_redis()
    keys = list(client.scan_iter(match=f"{KEY_NAMESPACE}:u:{int(user_id)}:*", count=1000))
    if keys:
        client.unlink(*keys)
    scopes = [s for s in api_settings.DEFAULT_THROTTLE_RATES if s.endswith("_user")]
    cache.delete_many([f"throttle_{scope}_{int(user_id)}" for scope in scopes])
    return len(keys)


@receiver(workspace_teardown, dispatch_uid="governance.counters_on_teardown")
def delete_counters_on_teardown(sender, *, user_id, project_id, **kwargs) -> None:
    project_counters_delete(project_id=project_id)


@receiver(pre_delete, sender=settings.AUTH_USER_MODEL, dispatch_uid="governance.user_deleted")
def anonymise_on_user_delete(sender, instance, **kwargs) -> None:
    # Whatever deletes a user (lifecycle.services.user_delete, the admin, the shell): the
    # usage of their runs becomes anonymised daily totals (what an operator keeps for
    # accounting) before the cascade takes the raw rows, and their audit trail stays,
    # anonymised. Inside the deleting transaction: all of it commits or none.
    usage_rollup_all(
        runs=RunUsage.objects.filter(user_id=instance.pk),
        embeddings=EmbeddingUsage.objects.filter(user_id=instance.pk),
        limit=ROLLUP_CHUNK,
        anonymise=True,
    )
    audit_anonymise_user(user_id=instance.pk, username=instance.get_username())
