"""Credentials narrower than their user: a key that reaches one project, with scopes.

An authentication class may put on `request.auth` an object with `project_id` and
`scopes` (a project-scoped API key). Everything that resolves a project from a request
honours it through the functions here, so a lower layer (projects) knows only this
protocol, not the app that issues the keys:

- `credential_project_id(auth)`: the one project the credential reaches, or None for a
  user's own credentials (token, session), which reach all the user's projects;
- `CredentialScopePermission`: a scoped credential may do what its scopes allow on the
  routes that name its project; any other project is a 404, other routes a 403.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection
from typing import Protocol, runtime_checkable

from rest_framework import exceptions
from rest_framework.permissions import SAFE_METHODS, BasePermission

READ, WRITE, CHAT = "read", "write", "chat"
SCOPES = (READ, WRITE, CHAT)


@runtime_checkable
class ProjectCredential(Protocol):
    project_id: uuid.UUID
    scopes: Collection[str]


def credential_project_id(auth) -> uuid.UUID | None:
    """The project a scoped credential is limited to; None for a user's own credential."""
    return auth.project_id if isinstance(auth, ProjectCredential) else None


def required_scope(view, method: str) -> str | None:
    """The scope a request needs: a view names it per method in `credential_scopes`
    (e.g. `{"POST": "chat"}`, or None to close a method to scoped credentials); by
    default reads need `read` and the rest `write`."""
    named = getattr(view, "credential_scopes", {})
    if method in named:
        return named[method]
    return READ if method in SAFE_METHODS else WRITE


def credential_check(auth, *, project_id, scope: str | None) -> None:
    """Raise unless the credential may use `scope` on `project_id` (None: a route that
    names no project). Another project is a 404 whatever the scope, as for a user."""
    limited_to = credential_project_id(auth)
    if limited_to is None:
        return
    if project_id is not None and str(project_id) != str(limited_to):
        raise exceptions.NotFound("No such project.")
    if scope is None:
        raise exceptions.PermissionDenied("Project API keys cannot use this route.")
    if scope not in auth.scopes:
        raise exceptions.PermissionDenied(f"This API key lacks the `{scope}` scope.")


class CredentialScopePermission(BasePermission):
    """Scoped credentials reach their project only, within their scopes. Routes without
    a project in their path are closed to them unless the view lists the method in
    `credential_scopes` (the project list, which then shows their project only)."""

    def has_permission(self, request, view) -> bool:
        if credential_project_id(request.auth) is None:
            return True
        project_id = getattr(view, "kwargs", {}).get("project_id")
        scope = required_scope(view, request.method)
        if project_id is None and request.method not in getattr(view, "credential_scopes", {}):
            scope = None
        credential_check(request.auth, project_id=project_id, scope=scope)
        return True
