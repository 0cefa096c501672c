from django.apps import AppConfig


class AutomationConfig(AppConfig):
    """Automation starts and reports runs without a person at a chat: schedules (one-off
    and cron, fired by beat's database scheduler into a session, through the chat
    services) and webhooks (signed deliveries of run events, retried, logged,
    replayable). It sits above chat and knows it; chat knows nothing of it (it sends
    `chat.signals.run_transitioned`)."""

    name = "automation"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Models can be imported only now: connects the receivers and registers the tasks.
        from . import receivers, tasks  # noqa: F401
