"""How the chat app plugs into the others: governance's run source, the runs health
check, the agent tool kind (an agent asking another), and a worker saying which runs it
received."""

from __future__ import annotations

import logging

from celery.signals import task_received

from agentbus import worker_identity
from governance.sources import register_run_source
from tools.registry import register_tool_kind
from workspaces.redis import scoped
from workspaces.sources import register_health_check, register_project_health_check

from . import streams
from .calls import agent_call
from .dispatch import RUN_TASK
from .selectors import project_runs_health, runs_health
from .sources import DatabaseRunSource

logger = logging.getLogger(__name__)

# Governance rebuilds its quota counters from the runs in the database.
register_run_source(DatabaseRunSource())
# Not a check that breaks every tenant: failed runs are some projects' problem.
register_health_check("runs", runs_health)
register_project_health_check("runs", project_runs_health)
register_tool_kind("agent", agent_call)


def mark_run_received(sender=None, request=None, **kwargs) -> None:
    """The run's task left the queue for this worker: if the worker dies before the run
    starts, the recovery pass sees whose it was (chat.dispatch) instead of waiting out
    the broker's visibility timeout."""
    if request is None or request.name != RUN_TASK:
        return
    try:
        task_kwargs = request.kwargs
        streams.runs_mark_reserved(
            redis=scoped(task_kwargs["user_id"], task_kwargs["project_id"]),
            run_id=task_kwargs["run_id"],
            worker=worker_identity(request.hostname),
        )
    except Exception:
        # Still marked "on the queue", the run is found once the queue is empty; a
        # mark must never fail the delivery.
        logger.warning("could not mark run received", exc_info=True)


task_received.connect(mark_run_received, weak=False, dispatch_uid="agents.run_received")
