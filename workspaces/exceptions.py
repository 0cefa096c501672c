"""Errors a workspace raises where a request or a task can see them."""

from rest_framework import status
from rest_framework.exceptions import APIException, NotFound


class WorkspaceUnavailable(APIException):
    """The workspace could not be initialised (Redis, the broker or the database failed).

    The registry keeps the Error state and the next request retries, so clients should
    retry shortly; hence 503 rather than 500.
    """

    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    default_detail = "The project's workspace is temporarily unavailable; retry shortly."
    default_code = "workspace_unavailable"


class WorkspaceGone(NotFound):
    """The project no longer exists (deleted, or being torn down)."""

    default_detail = "No such project."
    default_code = "not_found"
