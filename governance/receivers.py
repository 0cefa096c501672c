"""How governance follows a project's teardown: its quota counters and rate-limit keys
go with it (they would otherwise stay up to COUNTER_TTL)."""

from __future__ import annotations

import uuid

from django.core.cache import cache
from django.dispatch import receiver
from rest_framework.settings import api_settings

from common.redis import get_redis
from workspaces.signals import workspace_teardown

from .quotas import KEY_NAMESPACE


def project_counters_delete(*, project_id) -> int:
    """Delete the project's quota counters (`gov:p:<id>:*`) and its per-project rate
    limits; returns how many quota keys went."""
    project_id = uuid.UUID(str(project_id))  # as the counters and the URLs spell it
    client = get_redis()
    keys = list(client.scan_iter(match=f"{KEY_NAMESPACE}:p:{project_id}:*", count=1000))
    if keys:
        client.unlink(*keys)
    scopes = [s for s in api_settings.DEFAULT_THROTTLE_RATES if s.endswith("_project")]
    cache.delete_many([f"throttle_{scope}_{project_id}" for scope in scopes])
    return len(keys)


@receiver(workspace_teardown, dispatch_uid="governance.counters_on_teardown")
def delete_counters_on_teardown(sender, *, user_id, project_id, **kwargs) -> None:
    project_counters_delete(project_id=project_id)
