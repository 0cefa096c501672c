"""DRF's request pipeline for the async views that wait (an event stream, a search
waiting for a worker), which are not DRF views: one sync step authenticates with the
API's own authenticators, throttles as the route's DRF view would, checks the
credential's project and scope, scopes the project to the user, and hands back the
database connection before the wait.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from types import SimpleNamespace
from typing import TypeVar

from django.db import connections
from django.db.models import QuerySet
from django.http import HttpRequest
from rest_framework import exceptions
from rest_framework.request import Request
from rest_framework.settings import api_settings

from common.credentials import READ, credential_check
from common.throttling import ScopedRatesThrottle
from projects.models import Project
from projects.selectors import project_list

T = TypeVar("T")


def request_authorize(
    request: HttpRequest,
    *,
    project_id: uuid.UUID,
    then: Callable[[Request, QuerySet[Project]], T],
    throttle_scopes: dict[str, str] | None = None,
) -> T:
    """Authenticate, throttle (when `throttle_scopes` is given), check the credential may
    read `project_id`, then return `then(request, projects)`. `projects` is the project
    scoped to the user (and to a project-scoped credential), not read yet: empty for
    anyone else's, so whatever `then` reads through it is found only in a project the
    caller may read, and it reads the project with what it needs in one query. Raises
    DRF's APIExceptions (NotAuthenticated, AuthenticationFailed, Throttled,
    PermissionDenied) or Http404.

    Leaves no database connection open behind it: the wait that follows may last hours
    and must not hold one."""
    try:
        drf_request = Request(
            request,
            authenticators=[auth() for auth in api_settings.DEFAULT_AUTHENTICATION_CLASSES],
        )
        user = drf_request.user
        if not user or not user.is_authenticated:
            raise exceptions.NotAuthenticated()
        if throttle_scopes is not None:
            view = SimpleNamespace(
                throttle_scopes=throttle_scopes, kwargs={"project_id": project_id}
            )
            throttle = ScopedRatesThrottle()
            if not throttle.allow_request(drf_request, view):
                raise exceptions.Throttled(wait=throttle.wait())
        credential_check(drf_request.auth, project_id=project_id, scope=READ)
        projects = project_list(user=user, credential=drf_request.auth).filter(id=project_id)
        return then(drf_request, projects)
    finally:
        for connection in connections.all(initialized_only=True):
            if not connection.in_atomic_block:  # (a test's transaction stays open)
                connection.close()
