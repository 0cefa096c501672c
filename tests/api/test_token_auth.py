"""User tokens: a checked token is trusted a short while without a database read, and a
revoked one stops working (at once where it was revoked, within the bound elsewhere)."""

from __future__ import annotations

import time

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from rest_framework.authtoken.models import Token

from common import authentication

pytestmark = pytest.mark.django_db


def _token_reads(api) -> tuple[int, int]:
    """(status of a project list, how many times it read a token)."""
    with CaptureQueriesContext(connection) as queries:
        code = api.get("/my/projects/").status_code
    return code, sum("authtoken_token" in q["sql"] for q in queries.captured_queries)


def test_a_checked_token_is_not_read_again(api):
    assert _token_reads(api) == (200, 1)
    assert _token_reads(api) == (200, 0)


def test_a_deleted_token_stops_working_at_once(api, user):
    assert _token_reads(api)[0] == 200
    Token.objects.filter(user=user).delete()
    assert api.get("/my/projects/").status_code == 401


def test_a_deactivated_user_stops_working_at_once(api, user):
    assert _token_reads(api)[0] == 200
    user.is_active = False
    user.save(update_fields=["is_active"])
    assert api.get("/my/projects/").status_code == 401


def test_staff_rights_follow_a_saved_user(api, user):
    assert api.get("/admin/metrics").status_code == 403
    user.is_staff = True
    user.save(update_fields=["is_staff"])
    assert api.get("/admin/metrics").status_code == 200


def test_a_token_revoked_unseen_is_trusted_at_most_the_bound(api, user, settings, monkeypatch):
    """Deleted where this process gets no signal (another process, SQL): still trusted
    until AUTH_TOKEN_CACHE_SECONDS have passed since it was read, then a 401."""
    settings.AUTH_TOKEN_CACHE_SECONDS = 30
    assert _token_reads(api) == (200, 1)
    with connection.cursor() as cursor:
        cursor.execute("DELETE FROM authtoken_token WHERE user_id = %s", [user.pk])
    assert _token_reads(api) == (200, 0)
    later = time.monotonic() + 31
    monkeypatch.setattr(authentication.time, "monotonic", lambda: later)
    assert _token_reads(api) == (401, 1)


def test_each_request_gets_its_own_user(user):
    key = Token.objects.create(user=user).key
    auth = authentication.TokenAuthentication()
    first, _ = auth.authenticate_credentials(key)
    second, token = auth.authenticate_credentials(key)
    assert first is not second and first.pk == second.pk == user.pk
    assert token.user is second and token.key == key
    second.username = "changed"
    assert auth.authenticate_credentials(key)[0].username == user.username


def test_zero_reads_the_token_every_time(api, settings):
    settings.AUTH_TOKEN_CACHE_SECONDS = 0
    assert _token_reads(api) == (200, 1)
    assert _token_reads(api) == (200, 1)
