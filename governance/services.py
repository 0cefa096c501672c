"""Writes of the governance app: project API keys. Usage and quotas live in
`governance.usage` and `governance.quotas`."""

from __future__ import annotations

from datetime import timedelta

from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from projects.models import Project
from projects.services import project_lock_for_write

from .keys import SHOWN_PREFIX_LENGTH, key_generate, key_hash
from .models import ProjectApiKey, ProviderSettings
from .secrets import secret_encrypt

# `last_used_at` is written at most this often per key: not a write per request.
LAST_USED_RESOLUTION = timedelta(seconds=60)


def api_key_create(
    *, project: Project, name: str, scopes: list[str], created_by=None
) -> tuple[ProjectApiKey, str]:
    """A new key for the project; returns it and the key itself, which is not stored
    (only its hash) and cannot be shown again."""
    raw = key_generate()
    with transaction.atomic():
        project_lock_for_write(project_id=project.id)  # a 404 if a delete came first
        key = ProjectApiKey.objects.create(
            project=project,
            name=name,
            prefix=raw[:SHOWN_PREFIX_LENGTH],
            key_hash=key_hash(raw),
            scopes=sorted(set(scopes)),
            created_by=created_by,
        )
    return key, raw


def api_key_revoke(*, key: ProjectApiKey) -> ProjectApiKey:
    """Revoke a key: the next request that carries it is refused. Revoking a revoked
    key keeps its first revocation time."""
    ProjectApiKey.objects.filter(id=key.id, revoked_at__isnull=True).update(
        revoked_at=timezone.now()
    )
    key.refresh_from_db(fields=["revoked_at"])
    return key


def api_key_authenticate(*, raw_key: str) -> ProjectApiKey | None:
    """The active key `raw_key` is, with its project and owner loaded; None if there is
    none (unknown, revoked, or its owner is inactive). Read from the database on every
    request, so a revocation holds from the next request on."""
    key = (
        ProjectApiKey.objects.select_related("project__owner")
        .filter(key_hash=key_hash(raw_key), revoked_at__isnull=True)
        .first()
    )
    if key is None or not key.project.owner.is_active:
        return None
    now = timezone.now()
    if key.last_used_at is None or now - key.last_used_at >= LAST_USED_RESOLUTION:
        ProjectApiKey.objects.filter(
            Q(last_used_at__isnull=True) | Q(last_used_at__lt=now - LAST_USED_RESOLUTION),
            id=key.id,
        ).update(last_used_at=now)
        key.last_used_at = now
    return key


# --- Provider settings ------------------------------------------------------------------

KEEP = object()  # provider_settings_update: leave the stored API key as it is


def provider_settings_update(
    *,
    project: Project,
    base_url: str,
    default_model: str,
    allowed_models: list[str],
    api_key=KEEP,
) -> ProviderSettings:
    """Replace the project's provider settings (an empty field falls back to the
    deployment's). `api_key`: KEEP leaves it, "" removes it, else it is stored
    encrypted."""
    with transaction.atomic():
        project_lock_for_write(project_id=project.id)  # a 404 if a delete came first
        found, _ = ProviderSettings.objects.get_or_create(project=project)
        found.base_url = base_url
        found.default_model = default_model
        found.allowed_models = list(dict.fromkeys(allowed_models))
        if api_key is not KEEP:
            found.api_key_encrypted = secret_encrypt(api_key)
        found.save()
    return found
