"""Maintenance tasks of the AgentBus (maintenance queue, run by beat)."""

from __future__ import annotations

from celery import shared_task

from .bus import get_agent_bus


@shared_task(name="workspaces.reap_idle_queues", ignore_result=True)
def reap_idle_queues() -> dict[str, int]:
    """Retire idle empty project queues; re-activate queues stranded with messages."""
    bus = get_agent_bus()
    retired = bus.reap_idle_queues()
    rescued = bus.rescue_stranded_queues()
    return {"retired": len(retired), "rescued": len(rescued)}
