"""Secrets at rest: Fernet (AES-128-CBC with HMAC-SHA256) under keys from the environment;
the database alone gives no provider key or project secret back.

Keys are a list (MultiFernet): PROVIDER_KEYS_FERNET_KEYS, comma-separated, the first
encrypts and every one decrypts, so a key is rotated by putting the new one first,
running `manage.py rotate_secrets` (re-encrypts every stored secret under it), then
dropping the old one. The single PROVIDER_KEYS_FERNET_KEY still works: it is the only
key, or the last (oldest) one after the list.
"""

from __future__ import annotations

import functools

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from django.conf import settings
from django.core import checks
from django.core.exceptions import ImproperlyConfigured
from django.db import models


class SecretUnreadable(Exception):
    """Encrypted under a key no longer configured, or corrupted."""


def configured_keys() -> list[str]:
    keys = [k.strip() for k in getattr(settings, "PROVIDER_KEYS_FERNET_KEYS", None) or ()]
    single = (settings.PROVIDER_KEYS_FERNET_KEY or "").strip()
    if single and single not in keys:
        keys.append(single)
    return [k for k in keys if k]


@functools.lru_cache(maxsize=8)
def _multi(keys: tuple[str, ...]) -> MultiFernet:
    if not keys:
        raise ValueError("no Fernet key configured (PROVIDER_KEYS_FERNET_KEYS)")
    return MultiFernet([Fernet(k) for k in keys])


def _fernet() -> MultiFernet:
    return _multi(tuple(configured_keys()))


def secret_encrypt(plaintext: str) -> str:
    return _fernet().encrypt(plaintext.encode()).decode() if plaintext else ""


def secret_decrypt(ciphertext: str) -> str:
    if not ciphertext:
        return ""
    try:
        return _fernet().decrypt(ciphertext.encode()).decode()
    except InvalidToken:
        raise SecretUnreadable("the stored secret cannot be decrypted") from None


def secret_readable(ciphertext: str) -> bool:
    try:
        secret_decrypt(ciphertext)
    except SecretUnreadable:
        return False
    return True


def secret_rotate(ciphertext: str) -> str:
    """The same secret, encrypted under the first key."""
    if not ciphertext:
        return ""
    try:
        return _fernet().rotate(ciphertext.encode()).decode()
    except InvalidToken:
        raise SecretUnreadable("the stored secret cannot be decrypted") from None


class EncryptedTextField(models.TextField):
    """Text stored encrypted (secret_encrypt), read back in clear: the model and its
    callers see the value, the database and its dumps see only the token."""

    def from_db_value(self, value, expression, connection):
        return secret_decrypt(value) if value else value

    def get_prep_value(self, value):
        value = super().get_prep_value(value)
        return secret_encrypt(value) if value else value


@checks.register(checks.Tags.security)
def check_fernet_keys(app_configs=None, **kwargs) -> list[checks.CheckMessage]:
    """Every configured key must be a Fernet key: a bad one would pass start-up and fail
    at the first secret written."""
    errors = []
    keys = configured_keys()
    if not keys:
        errors.append(
            checks.Error(
                "No Fernet key: set PROVIDER_KEYS_FERNET_KEYS (or PROVIDER_KEYS_FERNET_KEY).",
                id="governance.E001",
            )
        )
    for position, key in enumerate(keys, 1):
        try:
            Fernet(key)
        except (ValueError, TypeError):
            errors.append(
                checks.Error(
                    f"Fernet key #{position} of PROVIDER_KEYS_FERNET_KEYS / "
                    "PROVIDER_KEYS_FERNET_KEY is malformed (it must be 32 url-safe base64 "
                    "bytes, e.g. from Fernet.generate_key()).",
                    id="governance.E002",
                )
            )
    return errors


def fernet_keys_required_valid() -> None:
    """For the entry points (ASGI, WSGI): refuse to start on a missing or malformed key,
    as `manage.py check` does, rather than fail at the first secret written."""
    errors = check_fernet_keys()
    if errors:
        raise ImproperlyConfigured(errors[0].msg)
