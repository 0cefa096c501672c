"""What every per-project endpoint starts from: the project, scoped to the user."""

from __future__ import annotations

from functools import cached_property

from rest_framework.request import Request
from rest_framework.views import APIView

from .models import Project
from .selectors import project_get_for_user


class ProjectScopedApi(APIView):
    """Resolves `project_id` from the URL to `self.project` before any handler runs:
    another user's project is a 404, and so is any project but its own for a
    project-scoped API key (common.credentials). A database read only; nothing here needs Redis.

    A method listed in `project_read_by_handler` reads the project in its handler
    instead, with the object it acts on, in one query (a chat message: its session),
    and sets `self.project`; where that finds nothing, reading `self.project` gives the
    project's own 404 first, as before any handler."""

    project_read_by_handler: frozenset[str] = frozenset()

    def initial(self, request: Request, *args, **kwargs) -> None:
        super().initial(request, *args, **kwargs)  # authentication and permissions first
        if request.method not in self.project_read_by_handler:
            self.project  # noqa: B018  (its 404 before any handler)

    @cached_property
    def project(self) -> Project:
        return project_get_for_user(
            user=self.request.user,
            project_id=self.kwargs["project_id"],
            credential=self.request.auth,
        )
