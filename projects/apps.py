from django.apps import AppConfig


class ProjectsConfig(AppConfig):
    """Projects owns the Project, the unit of isolation: its model, the user-scoped
    selector every per-project route starts from, and the delete that announces
    `project_deleted`; it imports no other app of ours."""

    name = "projects"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Models can be imported only now: connects the receivers.
        from . import receivers  # noqa: F401
