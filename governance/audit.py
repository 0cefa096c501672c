"""The audit log: every mutation through the API or the admin, recorded once.

`AuditMiddleware` records, after the response:

- an API mutation (POST, PUT, PATCH, DELETE under /my/) that succeeded (2xx): its
  route, the project it touched (the path's, or the one it created), the user and the
  credential (token, session, or which project key), the client address;
- each entry the Django admin wrote to its own log during an admin request (add,
  change, delete of any model), mirrored once (`admin_log_id` is unique).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
from datetime import timedelta

from django.conf import settings
from django.contrib.admin.models import ADDITION, CHANGE, DELETION, LogEntry
from django.db.models import Q
from django.utils import timezone
from django.utils.deprecation import MiddlewareMixin
from rest_framework.throttling import BaseThrottle

from common.budget import Budget
from common.credentials import credential_project_id
from projects.models import Project

from .models import AuditEvent, ProjectApiKey

logger = logging.getLogger(__name__)

MUTATIONS = ("POST", "PUT", "PATCH", "DELETE")
ADMIN_ACTIONS = {ADDITION: "add", CHANGE: "change", DELETION: "delete"}


def _address(request) -> str | None:
    # The client as the rate limits see it: X-Forwarded-For only behind trusted proxies.
    address = BaseThrottle().get_ident(request)
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        return None


def _who(request) -> dict:
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        return {}
    if user.pk is None:  # the request deleted its own user: recorded anonymised
        return {"user": None, "username": getattr(request, "audit_pseudonym", ""),
                "credential": AuditEvent.Credential.TOKEN}  # fmt: skip
    auth = getattr(request, "auth", None)
    if isinstance(auth, ProjectApiKey):
        credential, prefix = AuditEvent.Credential.KEY, auth.prefix
    elif auth is not None:
        credential, prefix = AuditEvent.Credential.TOKEN, ""
    else:
        credential, prefix = AuditEvent.Credential.SESSION, ""
    return {"user": user, "username": user.get_username(), "credential": credential,
            "key_prefix": prefix}  # fmt: skip


def audit_api_mutation(*, request, response) -> AuditEvent | None:
    who = _who(request)
    if not who:
        return None
    match = request.resolver_match
    project_id = (match.kwargs.get("project_id") if match else None) or credential_project_id(
        getattr(request, "auth", None)
    )
    data = getattr(response, "data", None)
    if project_id is None and match and match.url_name == "project-list" and isinstance(data, dict):
        project_id = data.get("id")  # the project this request created
    return AuditEvent.objects.create(
        project_id=project_id,
        method=request.method,
        path=request.path[:500],
        action=f"{request.method} /{match.route}" if match else request.method,
        status_code=response.status_code,
        ip_address=_address(request),
        **who,
    )


def _project_of(entry: LogEntry):
    model = entry.content_type.model_class() if entry.content_type_id else None
    if model is Project:
        return entry.object_id
    if model is None or not any(f.name == "project" for f in model._meta.fields):
        return None
    found = model._default_manager.filter(pk=entry.object_id).values_list("project_id").first()
    return found[0] if found else None


def audit_admin_entries(*, request, since) -> int:
    """Mirror the admin log entries the request's user wrote since `since`."""
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        return 0
    entries = LogEntry.objects.filter(user=user, action_time__gte=since).select_related(
        "content_type"
    )
    events = [
        AuditEvent(
            project_id=_project_of(entry),
            user=user,
            username=user.get_username(),
            credential=AuditEvent.Credential.ADMIN,
            method=request.method,
            path=request.path[:500],
            action=f"{ADMIN_ACTIONS.get(entry.action_flag, 'other')} "
            f"{entry.content_type.app_label}.{entry.content_type.model}"
            if entry.content_type_id
            else "admin",
            object_repr=entry.object_repr[:200],
            ip_address=_address(request),
            admin_log_id=entry.id,
        )
        for entry in entries
    ]
    AuditEvent.objects.bulk_create(events, ignore_conflicts=True)
    return len(events)


class AuditMiddleware(MiddlewareMixin):
    """After authentication: records the request's mutations once it has answered.
    Reads (and event streams, searches) pass through on the event loop, without a hop
    to a thread: they record nothing."""

    async def __acall__(self, request):
        if request.method not in MUTATIONS:
            return await self.get_response(request)
        return await super().__acall__(request)

    def process_request(self, request):
        if request.method in MUTATIONS:
            request.audit_started = timezone.now()

    def process_response(self, request, response):
        if request.method not in MUTATIONS:
            return response
        try:
            if request.path.startswith("/my/") and 200 <= response.status_code < 300:
                audit_api_mutation(request=request, response=response)
            elif request.path.startswith("/admin/") and hasattr(request, "audit_started"):
                audit_admin_entries(request=request, since=request.audit_started)
        except Exception:
            # The mutation happened; its record is missing. Loud, but not a failed request.
            logger.exception("audit: %s %s not recorded", request.method, request.path)
        return response


def audit_purge(*, batch: int | None = None, budget_seconds: float | None = None) -> int:
    """Delete records older than AUDIT_RETENTION_DAYS, a batch at a time, for at most
    AUDIT_PURGE_BUDGET_SECONDS (common.budget): the next run goes on."""
    batch = batch or settings.AUDIT_PURGE_BATCH
    budget = Budget(
        settings.AUDIT_PURGE_BUDGET_SECONDS if budget_seconds is None else budget_seconds
    )
    cutoff = timezone.now() - timedelta(days=settings.AUDIT_RETENTION_DAYS)
    deleted = 0
    while True:
        ids = list(
            AuditEvent.objects.filter(created_at__lt=cutoff).values_list("id", flat=True)[:batch]
        )
        if not ids:
            return deleted
        deleted += AuditEvent.objects.filter(id__in=ids).delete()[0]
        if budget.over():
            logger.info("audit purge: %d deleted, out of time; the next run goes on", deleted)
            return deleted


def audit_pseudonym(user_id: int) -> str:
    """What a deleted user's audit records say instead of their name: the same for all of
    one user's records (they stay linkable), computable only with the deployment's key."""
    digest = hmac.new(settings.SECRET_KEY.encode(), f"user:{user_id}".encode(), hashlib.sha256)
    return f"deleted-user-{digest.hexdigest()[:12]}"


def audit_anonymise_user(*, user_id: int, username: str) -> int:
    """Keep a deleted user's audit trail in its anonymised form: no user id, no name (the
    pseudonym instead, in `object_repr` too), no client address. The one update the
    append-only trigger lets through (governance migration 0007) is exactly this one.
    Returns how many records it anonymised."""
    pseudonym = audit_pseudonym(user_id)
    if username:  # their name as the object of others' records (the admin's user pages)
        about = Q(user_id=user_id) | Q(action__endswith="auth.user")
        AuditEvent.objects.filter(about, object_repr=username).update(object_repr=pseudonym)
    return AuditEvent.objects.filter(user_id=user_id).update(
        user_id=None, username=pseudonym, ip_address=None
    )
