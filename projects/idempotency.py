"""`Idempotency-Key` on the POSTs that create work (a message, a regenerated answer, a
context job, a schedule): a client that retries after a timeout or a dropped connection
gets the first answer again and nothing is created twice.

- The same key (per user and project) with the same request (method, path, canonical
  JSON body) within IDEMPOTENCY_KEY_TTL_SECONDS answers the first response, with
  `Idempotent-Replayed: true`, and creates nothing.
- The same key with another request is a 422 (`idempotency_key_reused`).
- While the first request with a key is still working, another one with that key is a
  409 (`idempotency_key_in_use`) with `Retry-After`; retried, it gets the stored answer.
- Only a success (2xx) is kept: an error created nothing, so the key stays free for a
  corrected retry.

Why the database, not Redis `SET NX`: the answer must be stored in the same transaction
as the work it describes (the message and its run). A Redis key and a database commit
can disagree after a crash (work committed, key lost: a retry creates it twice; key set,
work rolled back: a retry is answered with something that does not exist). Here the claim
is a row insert under a unique constraint (atomic across processes, whichever database),
committed at once so concurrent duplicates see it without waiting on a lock; the work and
the stored answer then commit together. A claim whose request died before committing is
taken over after IDEMPOTENCY_CLAIM_SECONDS (nothing of its work committed).
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from datetime import timedelta

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone
from rest_framework import status
from rest_framework.exceptions import APIException, ValidationError
from rest_framework.response import Response

from common.exceptions import Conflict

from .models import IdempotencyKey

HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
# Printable ASCII without spaces, as the IETF draft's examples and Stripe's keys.
KEY_PATTERN = r"^[\x21-\x7e]{1,255}$"
_KEY = re.compile(KEY_PATTERN)


class IdempotencyKeyReused(APIException):
    status_code = status.HTTP_422_UNPROCESSABLE_ENTITY
    default_detail = (
        "This Idempotency-Key was used for another request (another path or body) "
        "within the last 24 hours; use a new key for a new request."
    )
    default_code = "idempotency_key_reused"


class IdempotencyKeyInUse(Conflict):
    default_detail = (
        "A request with this Idempotency-Key is still being processed; retry shortly to "
        "get its answer."
    )
    default_code = "idempotency_key_in_use"

    def __init__(self) -> None:
        super().__init__()
        self.wait = 1  # DRF's handler sends it as Retry-After


def request_fingerprint(request) -> str:
    """sha256 of the method, the path and the body as parsed JSON (key order and
    whitespace do not make another request)."""
    try:
        body = json.dumps(request.data, sort_keys=True, separators=(",", ":"), default=str)
    except (TypeError, ValueError):
        body = repr(request.data)
    raw = f"{request.method}\n{request.path}\n{body}".encode()
    return hashlib.sha256(raw).hexdigest()


def _claim(*, user_id: int, project_id, key: str, fingerprint: str) -> IdempotencyKey | None:
    """Claim `key` for this request: the row when claimed (new, expired or abandoned),
    None when another request holds or answered it (the caller reads that row)."""
    now = timezone.now()
    try:
        with transaction.atomic():
            return IdempotencyKey.objects.create(
                user_id=user_id, project_id=project_id, key=key, fingerprint=fingerprint,
                claimed_at=now,
            )  # fmt: skip
    except IntegrityError:
        pass
    row = IdempotencyKey.objects.filter(user_id=user_id, project_id=project_id, key=key).first()
    if row is None:  # expired and purged meanwhile: claim it again
        return _claim(user_id=user_id, project_id=project_id, key=key, fingerprint=fingerprint)
    expired = row.created_at < now - timedelta(seconds=settings.IDEMPOTENCY_KEY_TTL_SECONDS)
    abandoned = row.response_status is None and row.claimed_at < now - timedelta(
        seconds=settings.IDEMPOTENCY_CLAIM_SECONDS
    )
    if expired or abandoned:
        # Conditional on the claim seen: of two takers, one wins.
        taken = IdempotencyKey.objects.filter(id=row.id, claimed_at=row.claimed_at).update(
            fingerprint=fingerprint,
            claimed_at=now,
            created_at=now,
            response_status=None,
            response_body=None,
        )
        if taken:
            row.refresh_from_db()
            return row
        row.refresh_from_db()
    return _answer_of(row, fingerprint)


def _answer_of(row: IdempotencyKey, fingerprint: str) -> None:
    """Raise what a request meeting someone else's claim gets."""
    if row.fingerprint != fingerprint:
        raise IdempotencyKeyReused()
    if row.response_status is None:
        raise IdempotencyKeyInUse()
    raise _Replay(row)


class _Replay(Exception):
    def __init__(self, row: IdempotencyKey) -> None:
        self.row = row


def idempotent(post):
    """Decorate a ProjectScopedApi's `post`: honour the request's Idempotency-Key (see
    the module docstring). The schema (common.schema.AutoSchema) documents the header
    and the 409/422 on every decorated operation."""

    @functools.wraps(post)
    def wrapper(self, request, *args, **kwargs):
        key = request.headers.get(HEADER)
        if key is None:
            return post(self, request, *args, **kwargs)
        if not _KEY.match(key):
            raise ValidationError(
                {HEADER: ["1 to 255 printable ASCII characters, without spaces."]}
            )
        fingerprint = request_fingerprint(request)
        user_id, project_id = request.user.id, self.project.id
        try:
            row = _claim(user_id=user_id, project_id=project_id, key=key, fingerprint=fingerprint)
        except _Replay as replay:
            response = Response(replay.row.response_body, status=replay.row.response_status)
            response[REPLAYED_HEADER] = "true"
            return response
        try:
            with transaction.atomic():
                response = post(self, request, *args, **kwargs)
                if not 200 <= response.status_code < 300:
                    raise _NotKept(response)
                # The answer commits with the work, or neither does.
                IdempotencyKey.objects.filter(id=row.id, claimed_at=row.claimed_at).update(
                    response_status=response.status_code,
                    response_body=json.loads(json.dumps(response.data, default=str)),
                )
        except _NotKept as not_kept:
            _release(row)
            return not_kept.response
        except BaseException:
            _release(row)
            raise
        return response

    wrapper.idempotent = True
    return wrapper


class _NotKept(Exception):
    def __init__(self, response) -> None:
        self.response = response


def _release(row: IdempotencyKey) -> None:
    """The request failed and created nothing: free its key for a corrected retry."""
    IdempotencyKey.objects.filter(
        id=row.id, claimed_at=row.claimed_at, response_status__isnull=True
    ).delete()


def idempotency_keys_purge() -> int:
    """Delete keys past their lifetime (beat); returns how many."""
    cutoff = timezone.now() - timedelta(seconds=settings.IDEMPOTENCY_KEY_TTL_SECONDS)
    return IdempotencyKey.objects.filter(created_at__lt=cutoff).delete()[0]
