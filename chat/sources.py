"""The chat app as governance's run source (governance.sources.RunSource)."""

from __future__ import annotations

import uuid
from datetime import datetime

from .models import Run
from .state import ACTIVE


class DatabaseRunSource:
    """Runs as governance counts them against quotas."""

    @staticmethod
    def _runs(*, project_id=None, user_id=None):
        runs = Run.objects.all()
        if project_id is not None:
            runs = runs.filter(session__project_id=project_id)
        if user_id is not None:
            runs = runs.filter(session__project__owner_id=user_id)
        return runs

    def in_flight(self, *, project_id=None, user_id=None) -> list[tuple[uuid.UUID, datetime]]:
        runs = self._runs(project_id=project_id, user_id=user_id)
        live = runs.filter(status__in=ACTIVE)
        return list(live.values_list("id", "created_at"))

    def accepted_since(self, *, since: datetime, project_id=None, user_id=None) -> int:
        return (
            self._runs(project_id=project_id, user_id=user_id).filter(created_at__gte=since).count()
        )
