from django.apps import AppConfig


class LifecycleConfig(AppConfig):
    """How long data lives and where it goes: retention (per deployment and per
    project), a user's erasure, project export and import. It sits on top of the apps
    whose data it removes or carries (chat, context, agents, governance, workspaces)
    and below config; nothing imports it."""

    name = "lifecycle"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from . import (  # noqa: F401  (they register themselves)
            accounts,  # its receivers: a deleted user's erasure
            receivers,  # a deleted project's archives
            retention_kinds,  # session context and webhook deliveries as retention kinds
            tasks,  # registered in every process: the web side puts them on the bus by name
        )
