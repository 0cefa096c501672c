from django.apps import AppConfig


class AgentBusConfig(AppConfig):
    """The AgentBus owns the per-project Celery queues: publishing onto them, the active
    set the shared workers follow, the reaper and rescue, tombstones (the lifecycle guard)
    and the worker's side; it knows nothing of agents, projects' models or chat."""

    name = "agentbus"
    verbose_name = "AgentBus"

    def ready(self) -> None:
        # Registers the workers' control commands (Celery needs them imported once).
        from . import worker  # noqa: F401
