"""What a run of a project's agent asks its LLM endpoint with: the project's provider
settings over the deployment's. Read by workers when a run builds its provider."""

from __future__ import annotations

from dataclasses import dataclass

from .models import ProviderSettings
from .secrets import secret_decrypt


class ModelNotAllowed(Exception):
    """The agent asks a model its project does not allow; str() says which."""


@dataclass(frozen=True)
class ProjectLLM:
    base_url: str = ""
    api_key: str = ""  # decrypted: never log, show or put in an event
    default_model: str = ""
    allowed_models: tuple[str, ...] = ()

    def __repr__(self) -> str:  # the key stays out of tracebacks and logs
        return (
            f"ProjectLLM(base_url={self.base_url!r}, api_key={'***' if self.api_key else ''!r}, "
            f"default_model={self.default_model!r}, allowed_models={self.allowed_models!r})"
        )

    @property
    def own_endpoint(self) -> bool:
        return bool(self.base_url or self.api_key)

    def model_for(self, model: str, fallback: str) -> str:
        """The model a run asks for (the agent's, else the project's default, else the
        deployment's), if the project allows it (its default model always is)."""
        chosen = model or self.default_model or fallback
        allowed = self.allowed_models
        if allowed and chosen not in allowed and chosen != self.default_model:
            raise ModelNotAllowed(
                f"the model {chosen!r} is not among this project's allowed models "
                f"({', '.join(self.allowed_models)})"
            )
        return chosen


def provider_settings_for(*, project_id) -> ProjectLLM | None:
    """The project's provider settings, or None: the deployment's apply."""
    found = ProviderSettings.objects.filter(project_id=project_id).first()
    if found is None:
        return None
    return ProjectLLM(
        base_url=found.base_url,
        api_key=secret_decrypt(found.api_key_encrypted),
        default_model=found.default_model,
        allowed_models=tuple(found.allowed_models or ()),
    )
