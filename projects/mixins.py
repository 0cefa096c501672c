"""What every per-project endpoint starts from: the project, scoped to the user."""

from __future__ import annotations

from rest_framework.request import Request
from rest_framework.views import APIView

from .models import Project
from .selectors import project_get_for_user


class ProjectScopedApi(APIView):
    """Resolves `project_id` from the URL to `self.project` before any handler runs:
    another user's project is a 404, and so is any project but its own for a
    project-scoped API key (common.credentials). A database read only; nothing here needs Redis."""

    project: Project

    def initial(self, request: Request, *args, **kwargs) -> None:
        super().initial(request, *args, **kwargs)  # authentication and permissions first
        self.project = project_get_for_user(
            user=request.user, project_id=kwargs["project_id"], credential=request.auth
        )
