from django.apps import AppConfig


class LlmConfig(AppConfig):
    """Clients of LLM endpoints: the providers agents answer through and their types, and
    the remote embedder's client. Uses governance (a project's provider settings)."""

    name = "llm"

    def ready(self) -> None:
        # Models can be imported only now: connects the receivers.
        from . import receivers  # noqa: F401
