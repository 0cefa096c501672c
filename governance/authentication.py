"""`Authorization: Bearer uws_…` (or `Token uws_…`): a project-scoped API key.

The request then acts as the project's owner (`request.user`) with the key as
`request.auth`, which common.credentials limits to the key's project and scopes. Any
other token is left to the user-token authentication that follows this one.
"""

from __future__ import annotations

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import authentication, exceptions

from .keys import KEY_PREFIX
from .services import api_key_authenticate


class ProjectKeyAuthentication(authentication.BaseAuthentication):
    keywords = ("token", "bearer")

    def authenticate(self, request):
        parts = authentication.get_authorization_header(request).split()
        if len(parts) != 2 or parts[0].decode("latin-1").lower() not in self.keywords:
            return None
        if not parts[1].startswith(KEY_PREFIX.encode()):
            return None
        try:
            raw = parts[1].decode("ascii")
        except UnicodeError:
            raise exceptions.AuthenticationFailed("Invalid API key.") from None
        key = api_key_authenticate(raw_key=raw)
        if key is None:
            raise exceptions.AuthenticationFailed("Invalid or revoked API key.")
        return key.project.owner, key

    def authenticate_header(self, request) -> str:
        return 'Bearer realm="api"'


class ProjectKeyAuthenticationScheme(OpenApiAuthenticationExtension):
    target_class = "governance.authentication.ProjectKeyAuthentication"
    name = "projectKeyAuth"

    def get_security_definition(self, auto_schema):
        return {
            "type": "http",
            "scheme": "bearer",
            "description": "A project API key (`uws_…`, from POST …/keys/): "
            "`Authorization: Bearer <key>`. It reaches its project only, within its scopes.",
        }
