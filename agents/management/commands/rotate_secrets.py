"""Re-encrypt every stored secret (projects' provider keys and tool secrets) under the
first key of PROVIDER_KEYS_FERNET_KEYS. Run after putting a new key first; once it has
run, the old key can be dropped from the list."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from agents.models import ProjectSecret
from governance.models import ProviderSettings
from governance.secrets import SecretUnreadable, secret_rotate


class Command(BaseCommand):
    help = "Re-encrypt every stored secret under the first Fernet key."

    def handle(self, *args, **options):
        rotated = {"provider keys": 0, "tool secrets": 0}
        try:
            with transaction.atomic():
                settings_rows = ProviderSettings.objects.select_for_update().exclude(
                    api_key_encrypted=""
                )
                for row in settings_rows:
                    new = secret_rotate(row.api_key_encrypted)
                    ProviderSettings.objects.filter(pk=row.pk).update(api_key_encrypted=new)
                    rotated["provider keys"] += 1
                # The field decrypts on read (any key) and encrypts on write (the first).
                for secret in ProjectSecret.objects.select_for_update():
                    ProjectSecret.objects.filter(pk=secret.pk).update(value=secret.value)
                    rotated["tool secrets"] += 1
        except SecretUnreadable:
            raise CommandError(
                "a stored secret decrypts under none of the configured keys: nothing was "
                "changed (keep the old key in the list until rotation succeeds)"
            ) from None
        self.stdout.write(
            ", ".join(f"{count} {what}" for what, count in rotated.items())
            + " re-encrypted under the first key"
        )
