"""Maintenance tasks of the AgentBus (maintenance queue, run by beat)."""

from __future__ import annotations

from celery import shared_task

from .active import reap_idle_queues as reap
from .active import rescue_stranded_queues, sweep_ready


@shared_task(name="agentbus.reap_idle_queues", ignore_result=True)
def reap_idle_queues() -> dict[str, int]:
    """Retire idle empty project queues; re-activate queues stranded with messages; list
    again active queues whose messages the ready list missed (if no shared worker did
    within AGENTBUS_READY_SWEEP_SECONDS)."""
    retired = reap()
    rescued = rescue_stranded_queues()
    listed = sweep_ready()
    return {"retired": len(retired), "rescued": len(rescued), "listed": listed or 0}
