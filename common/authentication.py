"""API token authentication: `Authorization: Token <key>` or `Authorization: Bearer <key>`.

Both schemes carry the same DRF token; `Bearer` is what most HTTP clients and generated
SDKs send.
"""

from __future__ import annotations

from rest_framework import authentication, exceptions


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

    def authenticate_header(self, request) -> str:
        return 'Bearer realm="api"'
