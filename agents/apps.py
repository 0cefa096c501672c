from django.apps import AppConfig


class AgentsConfig(AppConfig):
    """Agents owns what users build and talk to: agents, chat sessions and messages, their
    APIs and event streams, and the runtime that answers on workers (LLM providers,
    embeddings, the vector store); it uses projects, workspaces and the AgentBus."""

    name = "agents"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Models can be imported only now: connects the receivers, registers the source.
        from . import (  # noqa: F401
            memory,  # registers memory block definitions as a section of agent versions
            receivers,
        )
