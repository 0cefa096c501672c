from django.apps import AppConfig


class AgentsConfig(AppConfig):
    """Agents owns the catalogue users build: agents, their tools and secrets, memory
    blocks and versions, with their API and admin. Chats, context and tool execution are
    the apps above it (`chat`, `context`, `tools`)."""

    name = "agents"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Models can be imported only now: connects the receivers, registers the source.
        from . import (  # noqa: F401
            memory,  # registers memory block definitions as a section of agent versions
            receivers,
        )
