"""How the chat app plugs into the others: governance's run source, the runs health
check, the agent tool kind (an agent asking another), a worker saying which runs it
received, and a worker that runs agents loading the provider client and the embedder
as it starts."""

from __future__ import annotations

import logging
import threading
import time

from celery.concurrency import ALIASES as POOLS
from celery.signals import celeryd_after_setup
from django.conf import settings

from agentbus import on_task_received
from agentbus.queues import runs_project_tasks
from context.embeddings import get_embedder
from governance.sources import register_run_source
from llm.providers import provider_warm
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


def _mark_run_received(task_kwargs: dict, worker: str) -> None:
    # Still marked "on the queue" if this fails: the run is found once the queue is empty.
    streams.runs_mark_reserved(
        redis=scoped(task_kwargs["user_id"], task_kwargs["project_id"]),
        run_id=task_kwargs["run_id"],
        worker=worker,
    )


# A worker that dies before the run starts: the recovery pass (chat.dispatch) sees whose
# the run was.
on_task_received([RUN_TASK], _mark_run_received, what="run")


def runs_warm_up(sender=None, instance=None, **kwargs) -> None:
    """A worker that runs agents (agentbus.queues.runs_project_tasks) loads the provider
    client (~0.6 s) and the embedder (~0.3 s) as it starts. Left to the first runs,
    every one of a burst waits on the import lock and the embedder's construction.

    In a thread of its own: the worker starts taking tasks at once, and a run that comes
    meanwhile waits only for what is left of the load. Only where tasks run in this
    process (the threads pool, as the Procfile runs it, or solo): the prefork pool's
    processes are forked from this one, and one forked while the thread imports would
    inherit an import lock nobody releases."""
    if instance is None or not settings.WORKER_WARM_UP:
        return
    if not runs_project_tasks(instance.app.amqp.queues.consume_from or {}):
        return  # e.g. the urgent maintenance worker: it runs no agent
    pool = f"{instance.pool_cls.__module__}:{instance.pool_cls.__qualname__}"
    if pool not in (POOLS["threads"], POOLS["solo"]):
        return
    threading.Thread(target=_warm, name="runs-warm-up", daemon=True).start()


def _warm() -> None:
    started = time.monotonic()
    try:
        provider_warm()
        get_embedder()
    except Exception:
        logger.warning("warm-up failed: the first runs load what they need", exc_info=True)
        return
    took = time.monotonic() - started
    logger.info("runs warm: provider client and embedder loaded in %.2fs", took)


celeryd_after_setup.connect(runs_warm_up, weak=False, dispatch_uid="chat.runs_warm_up")
