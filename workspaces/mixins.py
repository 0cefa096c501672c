"""What every per-project endpoint goes through: the project, scoped to the user, and
its workspace, created on first use (the seed's `get_worker_space` dependency)."""

from __future__ import annotations

from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from projects.models import Project
from projects.selectors import project_get_for_user

from .manager import get_worker_space
from .space import UserWorkerSpace


class WorkerSpaceMixin(APIView):
    """Resolves `project_id` from the URL to `self.project` (404 for anyone but its owner)
    and `self.workspace`, before any handler runs. The workspace is InUse until the
    response is finalised."""

    project: Project
    workspace: UserWorkerSpace | None = None

    def initial(self, request: Request, *args, **kwargs) -> None:
        super().initial(request, *args, **kwargs)  # authentication and permissions first
        self.project = project_get_for_user(user=request.user, project_id=kwargs["project_id"])
        workspace = get_worker_space(user_id=request.user.pk, project_id=self.project.id)
        workspace.enter()
        self.workspace = workspace

    def finalize_response(self, request: Request, response: Response, *args, **kwargs):
        if self.workspace is not None:
            self.workspace.leave()
            self.workspace = None
        return super().finalize_response(request, response, *args, **kwargs)
