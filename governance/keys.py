"""The shape of project API keys: `uws_` and 43 URL-safe characters (256 random bits)."""

from __future__ import annotations

import hashlib
import secrets

KEY_PREFIX = "uws_"
SHOWN_PREFIX_LENGTH = len(KEY_PREFIX) + 8


def key_generate() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_hash(raw_key: str) -> str:
    return hashlib.sha256(raw_key.encode()).hexdigest()
