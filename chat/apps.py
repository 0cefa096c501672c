from django.apps import AppConfig


class ChatConfig(AppConfig):
    """Chat owns sessions, messages and runs: the chat API and its event stream, the
    dispatch and recovery of runs on the web side, and the engine that answers a run on a
    worker. `chat.state` is the one module that writes a run's or a message's status."""

    name = "chat"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Models can be imported only now: connects the receivers and registers the
        # agent tool kind, the run source and the health check; `tasks` registers the
        # task that `chat.dispatch` sends by name.
        from . import receivers, tasks  # noqa: F401
