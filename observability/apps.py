from django.apps import AppConfig


class ObservabilityConfig(AppConfig):
    """What operators look at: per-minute rollups and the dashboards drawn from them,
    the Prometheus metrics of HTTP, Celery tasks and processes."""

    name = "observability"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from . import receivers  # noqa: F401  (connects the Celery task metrics)
