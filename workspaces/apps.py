from django.apps import AppConfig


class WorkspacesConfig(AppConfig):
    """Workspaces owns each (user, project)'s backend state: the WorkerSpaceManager and
    UserWorkerSpace, the AgentCache and registry under the workspace's Redis prefix, the
    durable teardown and sweep, and operators' health, stats and admin pages; it uses the
    AgentBus and projects, and learns about agents through a registered agent source."""

    name = "workspaces"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Models can be imported only now: connects the receivers.
        from . import receivers  # noqa: F401
