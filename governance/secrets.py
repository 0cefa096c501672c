"""Secrets at rest: Fernet (AES-128-CBC with HMAC-SHA256) under PROVIDER_KEYS_FERNET_KEY,
a key from the environment; the database alone cannot give a provider key back."""

from __future__ import annotations

from cryptography.fernet import Fernet, InvalidToken
from django.conf import settings


class SecretUnreadable(Exception):
    """Encrypted under another key (PROVIDER_KEYS_FERNET_KEY changed) or corrupted."""


def _fernet() -> Fernet:
    return Fernet(settings.PROVIDER_KEYS_FERNET_KEY)


def secret_encrypt(plaintext: str) -> str:
    return _fernet().encrypt(plaintext.encode()).decode() if plaintext else ""


def secret_decrypt(ciphertext: str) -> str:
    if not ciphertext:
        return ""
    try:
        return _fernet().decrypt(ciphertext.encode()).decode()
    except InvalidToken:
        raise SecretUnreadable("the stored provider key cannot be decrypted") from None
