"""What governance needs to know of runs it does not own (the chat app registers it;
upward knowledge travels through registered callbacks): the runs in flight and the
messages accepted lately, as the database has them, to rebuild the quota counters."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Protocol


class RunSource(Protocol):
    def in_flight(self, *, project_id=None, user_id=None) -> list[tuple[uuid.UUID, datetime]]:
        """(run id, accepted at) of the runs not ended yet, of a project or a user."""
        ...

    def accepted_since(self, *, since: datetime, project_id=None, user_id=None) -> int:
        """How many runs (messages) were accepted since `since`."""
        ...


class _NoRuns:
    def in_flight(self, *, project_id=None, user_id=None):
        return []

    def accepted_since(self, *, since, project_id=None, user_id=None):
        return 0


_source: RunSource = _NoRuns()


def register_run_source(source: RunSource) -> None:
    global _source
    _source = source


def run_source() -> RunSource:
    return _source
