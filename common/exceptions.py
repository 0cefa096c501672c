"""The API's own exceptions (DRF's APIException), apart from common.api: the parsers
raise them, and common.api imports DRF's views, which load the parsers."""

from rest_framework import status
from rest_framework.exceptions import APIException


class BackendUnavailable(APIException):
    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    default_detail = "A service this request needs is unavailable; retry shortly."
    default_code = "backend_unavailable"


class PayloadTooLarge(APIException):
    status_code = status.HTTP_413_REQUEST_ENTITY_TOO_LARGE
    default_detail = "The request body is too large."
    default_code = "payload_too_large"


class Conflict(APIException):
    """The request is valid but collides with what exists (a taken name). Raise it with
    `{"<field>": ["<message>"]}` to name the field."""

    status_code = status.HTTP_409_CONFLICT
    default_detail = "The request conflicts with an existing object."
    default_code = "conflict"


class FieldNotFound(APIException):
    """A 404 for an id given in the body (e.g. an agent that is not in the project), naming
    the field: another user's object does not exist, whichever way it is named."""

    status_code = status.HTTP_404_NOT_FOUND
    default_detail = "Not found."
    default_code = "not_found"
