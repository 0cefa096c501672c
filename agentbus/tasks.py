"""Maintenance tasks of the AgentBus (maintenance queue, run by beat)."""

from __future__ import annotations

from celery import shared_task

from . import active


@shared_task(name="agentbus.reap_idle_queues", ignore_result=True)
def reap_idle_queues() -> dict[str, int]:
    """Retire idle empty project queues; re-activate queues stranded with messages."""
    retired = active.reap_idle_queues()
    rescued = active.rescue_stranded_queues()
    return {"retired": len(retired), "rescued": len(rescued)}
