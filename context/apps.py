from django.apps import AppConfig


class ContextConfig(AppConfig):
    """An agent's context memory: embeddings, the vector store (Qdrant), ingest jobs and
    searches, their API and their tasks. Uses the agents catalogue and the LLM clients
    (remote embeddings); knows nothing of chat."""

    name = "context"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Connects the receivers (teardown, agent deleted) and the store's shutdown.
        from . import receivers  # noqa: F401
