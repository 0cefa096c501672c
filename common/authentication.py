"""API token authentication: `Authorization: Token <key>` or `Authorization: Bearer <key>`.

Both schemes carry the same DRF token; `Bearer` is what most HTTP clients and generated
SDKs send.

A token this process checked is trusted again for AUTH_TOKEN_CACHE_SECONDS without a
database read (a busy client sends many requests a second). Deleting the token, or
saving or deleting its user (deactivating them, changing their staff flags), forgets
it at once in the process that did it; another process trusts it at most
AUTH_TOKEN_CACHE_SECONDS longer. Writes that send no signal (`QuerySet.update`, SQL)
wait out that bound everywhere, and so may a token revoked while a request was checking
it (the check stores what it read, after the signal found nothing to forget).
"""

from __future__ import annotations

import hashlib
import time

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver
from rest_framework import authentication, exceptions
from rest_framework.authtoken.models import Token

# sha256(key) -> (trusted until (monotonic), user id, token's fields, its user's fields).
# Values, not instances: every request gets objects of its own to read and change.
_checked: dict[bytes, tuple[float, int, tuple, tuple]] = {}
# Past this many tokens the cache starts again empty (a bound, not an LRU: reaching it
# needs that many clients within AUTH_TOKEN_CACHE_SECONDS).
CHECKED_MAX = 10_000


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _values(instance) -> tuple:
    return tuple(getattr(instance, f.attname) for f in instance._meta.concrete_fields)


def _instance(model, values: tuple, db: str):
    return model.from_db(db, [f.attname for f in model._meta.concrete_fields], values)


def tokens_forget(*, user_id=None, key: str | None = None) -> None:
    """Stop trusting, in this process, the checked token `key` or every token of `user_id`."""
    if key is not None:
        _checked.pop(_digest(key), None)
    if user_id is not None:
        for digest, checked in list(_checked.items()):
            if checked[1] == user_id:
                _checked.pop(digest, None)


@receiver(post_delete, sender=Token)
def _token_deleted(sender, instance, **kwargs) -> None:
    tokens_forget(key=instance.key)


@receiver([post_save, post_delete], sender=settings.AUTH_USER_MODEL)
def _user_changed(sender, instance, **kwargs) -> None:
    tokens_forget(user_id=instance.pk)


class TokenAuthentication(authentication.TokenAuthentication):
    keywords = ("Token", "Bearer")

    def authenticate(self, request):
        parts = authentication.get_authorization_header(request).split()
        if not parts or parts[0].decode("latin-1").lower() not in {
            k.lower() for k in self.keywords
        }:
            return None
        if len(parts) != 2:
            raise exceptions.AuthenticationFailed(
                "Invalid token header: expected `Token <key>` or `Bearer <key>`."
            )
        try:
            token = parts[1].decode()
        except UnicodeError:
            raise exceptions.AuthenticationFailed(
                "Invalid token header: the token contains invalid characters."
            ) from None
        return self.authenticate_credentials(token)

    def authenticate_credentials(self, key):
        ttl = settings.AUTH_TOKEN_CACHE_SECONDS
        if ttl <= 0:
            return super().authenticate_credentials(key)
        digest, now = _digest(key), time.monotonic()
        checked = _checked.get(digest)
        if checked is not None and checked[0] > now:
            db = Token.objects.db
            user = _instance(get_user_model(), checked[3], db)
            token = _instance(Token, checked[2], db)
            token.user = user
            return user, token
        user, token = super().authenticate_credentials(key)  # raises when invalid
        if len(_checked) >= CHECKED_MAX:
            _checked.clear()
        _checked[digest] = (now + ttl, user.pk, _values(token), _values(user))
        return user, token

    def authenticate_header(self, request) -> str:
        return 'Bearer realm="api"'
