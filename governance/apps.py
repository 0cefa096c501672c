from django.apps import AppConfig


class GovernanceConfig(AppConfig):
    """What operators and owners govern a tenant with: project-scoped API keys, usage
    accounting per run, and quotas checked before a run is accepted. It sits below
    chat, context and llm (which call it) and above workspaces; it imports nothing of
    them."""

    name = "governance"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from common import egress  # noqa: F401  (registers the check of its networks)

        from . import (  # noqa: F401  (they register themselves)
            receivers,  # a torn-down project's counters go with it
            secrets,  # the check of the Fernet keys
        )
