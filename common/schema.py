"""The OpenAPI schema's shared parts: the error body, the errors every operation can
answer, and the token authentication's security schemes.

`AutoSchema` adds to each operation the error responses that follow from its shape, so
no view can forget them: 400 (it takes a body or query parameters), 401 and 403 (it
needs a user), 404 (its path names objects), 413 and 415 (it takes a body), 429 (it is
rate limited: a login, or a method its view names in `throttle_scopes`). A view adds
what only it knows (409, 503) with `error_responses(...)`.
"""

from __future__ import annotations

from drf_spectacular import openapi
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse
from rest_framework import permissions, serializers

from .api import StrictSerializer
from .throttling import MethodScopedThrottle

ERROR_CODES_HELP = (
    "What went wrong, for programs: invalid, parse_error, not_authenticated, "
    "authentication_failed, permission_denied, csrf_failed, not_found, "
    "method_not_allowed, not_acceptable, conflict, payload_too_large, "
    "unsupported_media_type, throttled, quota_exceeded, backend_unavailable, server_error."
)


class ErrorSerializer(serializers.Serializer):
    """Every error the API answers (4xx and 5xx) has this shape. On a 400, each invalid
    field or parameter is also a key of its own, with its messages."""

    detail = serializers.CharField(help_text="What went wrong, for people.")
    code = serializers.CharField(help_text=ERROR_CODES_HELP)

    class Meta:
        ref_name = "Error"


_DESCRIPTIONS = {
    400: "Invalid input: `detail` says what; each invalid field or parameter is a key "
    "of its own with its messages.",
    401: "No credentials, or invalid ones (`Authorization: Token <key>` or `Bearer <key>`).",
    403: "Not allowed: staff only, or a session (cookie) client without its CSRF token.",
    404: "No such object for this user: it does not exist, or it is someone else's.",
    409: "Conflicts with an existing object.",
    413: "The request body is too large.",
    415: "The body is not `application/json`.",
    422: "This `Idempotency-Key` was used for another request (path or body) within "
    "24 hours; nothing was done.",
    429: "Too many requests of this kind from this user or for this project; retry after "
    "`Retry-After` seconds. Nothing was done.",
    503: "A service this request needs (Redis, the broker, a worker) is unavailable; "
    "retry after `Retry-After` seconds.",
}


def error_responses(*codes: int, **descriptions: str) -> dict[int, OpenApiResponse]:
    """`responses` entries for errors: `error_responses(409, 503)`; a description can be
    given as `_409="..."`."""
    return {
        code: OpenApiResponse(
            ErrorSerializer, description=descriptions.get(f"_{code}", _DESCRIPTIONS[code])
        )
        for code in codes
    }


def _own_throttles(view) -> list[type]:
    """Throttles that limit every request of the view (the scoped ones limit only the
    methods a view names)."""
    return [t for t in view.throttle_classes if not issubclass(t, MethodScopedThrottle)]


# The header of the POSTs that create work (projects.idempotency marks their handlers);
# kept here, the schema's layer, so the schema needs no app of ours.
IDEMPOTENCY_PARAMETER = OpenApiParameter(
    name="Idempotency-Key",
    location=OpenApiParameter.HEADER,
    required=False,
    pattern=r"^[\x21-\x7e]{1,255}$",
    description="Makes a retry safe: the same key with the same request within 24 "
    "hours answers the first response (header `Idempotent-Replayed: true`) and creates "
    "nothing; with another request it is a 422; while the first is still working, a 409 "
    "with `Retry-After`. 1 to 255 printable ASCII characters, e.g. a UUID.",
)


class AutoSchema(openapi.AutoSchema):
    def _idempotent(self) -> bool:
        handler = getattr(self.view, (self.method or "").lower(), None)
        return bool(getattr(handler, "idempotent", False))

    def get_override_parameters(self):
        parameters = list(super().get_override_parameters())
        if self._idempotent():
            parameters.append(IDEMPOTENCY_PARAMETER)
        return parameters

    def get_description(self) -> str:
        # Written for users in each operation's extend_schema; a view's docstring is for
        # the developers of this code and never becomes the public description.
        return ""

    def _standard_error_codes(self) -> list[int]:
        codes = []
        has_body = self.method in ("POST", "PUT", "PATCH") and self.get_request_serializer()
        has_query = any(p.get("in") == "query" for p in self._get_parameters())
        if has_body or has_query:
            codes.append(400)
        perms = [p.__class__ for p in self.view.get_permissions()]
        if permissions.AllowAny not in perms:
            codes += [401, 403]
        if "{" in self.path:
            codes.append(404)
        if has_body:
            codes += [413, 415]
        scoped = self.method in getattr(self.view, "throttle_scopes", {})
        if scoped or _own_throttles(self.view):
            codes.append(429)
        if self._idempotent():
            codes += [400, 409, 422]
        codes = list(dict.fromkeys(codes))
        return sorted(codes)

    def _map_basic_serializer(self, serializer, direction):
        schema = super()._map_basic_serializer(serializer, direction)
        if isinstance(serializer, StrictSerializer) and direction == "request":
            schema["additionalProperties"] = False  # unknown fields are a 400
        return schema

    def _get_response_bodies(self, direction="response"):
        responses = super()._get_response_bodies(direction)
        for code, response in error_responses(*self._standard_error_codes()).items():
            if str(code) not in responses:
                responses[str(code)] = self._get_response_for_code(
                    response, str(code), direction=direction
                )
        return dict(sorted(responses.items()))


class TokenAuthenticationScheme(OpenApiAuthenticationExtension):
    """`common.authentication.TokenAuthentication`: the same token under two schemes."""

    target_class = "common.authentication.TokenAuthentication"
    name = ["tokenAuth", "bearerAuth"]

    def get_security_requirement(self, auto_schema):
        return [{"tokenAuth": []}, {"bearerAuth": []}]

    def get_security_definition(self, auto_schema):
        return [
            {
                "type": "apiKey",
                "in": "header",
                "name": "Authorization",
                "description": "The API token with the prefix `Token `: "
                "`Authorization: Token <key>` (POST /auth/token/ gives the key).",
            },
            {
                "type": "http",
                "scheme": "bearer",
                "description": "The same API token as a bearer token: "
                "`Authorization: Bearer <key>`.",
            },
        ]


def postprocess_error_schema(result, generator, request, public):
    """The error body's field keys (drf-spectacular has no serializer for a free-form
    remainder): each is a list of messages."""
    error = result.get("components", {}).get("schemas", {}).get("Error")
    if error is not None:
        error["additionalProperties"] = {
            "type": "array",
            "items": {"type": "string"},
            "description": "400 only: the messages of one invalid field or parameter.",
        }
    return result
