from django.apps import AppConfig


class RealtimeConfig(AppConfig):
    name = "realtime"

    def ready(self) -> None:
        # Models can be imported only now: connects the receivers.
        from . import receivers  # noqa: F401
