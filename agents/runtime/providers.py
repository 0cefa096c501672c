"""LLM providers: any OpenAI-compatible endpoint, or the offline provider when none is configured.

A provider turns a prompt into a stream of text deltas. Whatever goes wrong on the way
(connection refused, HTTP error, a stalled stream past the timeout) surfaces as
`ProviderError`, so the caller can end the message in error instead of leaving it open.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from django.conf import settings

OFFLINE_MODEL = "offline"
# Agent params passed through to chat completions; the rest (e.g. top_k) are ours.
COMPLETION_PARAMS = ("temperature", "top_p", "max_tokens", "presence_penalty", "frequency_penalty")


class ProviderError(Exception):
    """The provider could not produce (the rest of) an answer; str() is the reason."""


@dataclass(frozen=True)
class ChatRequest:
    model: str
    # OpenAI chat format: [{"role": "system"|"user"|"assistant", "content": "..."}]
    messages: list[dict[str, str]]
    params: dict[str, Any] = field(default_factory=dict)
    # The retrieved context, also inside `messages`; the offline provider answers from it.
    context: list[str] = field(default_factory=list)
    question: str = ""


class Provider(Protocol):
    name: str

    def stream(self, request: ChatRequest) -> Iterator[str]:
        """Text deltas of the answer; closing the iterator releases the connection."""
        ...


class OfflineProvider:
    """Answers from the agent's retrieved context, without any model, and says so."""

    name = "offline"

    def answer(self, request: ChatRequest) -> str:
        intro = (
            "This is the offline provider: no language model is configured, "
            "so this answer is built from the agent's stored context."
        )
        if not request.context:
            return (
                f"{intro} Nothing in the agent's context matches your message "
                f"({_shorten(request.question, 200)!r})."
            )
        lines = [f"{intro} The most relevant context I hold:"]
        for i, text in enumerate(request.context, 1):
            lines.append(f"{i}. {_shorten(text, 500)}")
        return "\n".join(lines)

    def stream(self, request: ChatRequest) -> Iterator[str]:
        # A few words per delta, like a model would stream them.
        words = re.findall(r"\S+\s*", self.answer(request))
        for i in range(0, len(words), 4):
            yield "".join(words[i : i + 4])


class OpenAIProvider:
    """Chat completions over the official `openai` client, streamed."""

    name = "openai"

    def __init__(self, client: Any) -> None:
        self._client = client

    def stream(self, request: ChatRequest) -> Iterator[str]:
        import openai

        if not request.model:
            raise ProviderError("the agent has no model set")
        options = {k: request.params[k] for k in COMPLETION_PARAMS if k in request.params}
        try:
            stream = self._client.chat.completions.create(
                model=request.model, messages=request.messages, stream=True, **options
            )
        except openai.OpenAIError as exc:
            raise ProviderError(_describe(exc)) from exc
        try:
            for chunk in stream:
                for choice in chunk.choices or ():
                    delta = choice.delta.content if choice.delta else None
                    if delta:
                        yield delta
        except openai.OpenAIError as exc:
            raise ProviderError(_describe(exc)) from exc
        finally:
            stream.close()


def _describe(exc: Exception) -> str:
    import openai

    if isinstance(exc, openai.APITimeoutError):
        return f"the LLM provider did not answer within {settings.LLM_TIMEOUT_SECONDS:g}s"
    if isinstance(exc, openai.APIConnectionError):
        return "the LLM provider could not be reached"
    if isinstance(exc, openai.APIStatusError):
        return f"the LLM provider answered HTTP {exc.status_code}: {_shorten(str(exc), 300)}"
    return f"the LLM provider failed: {_shorten(str(exc), 300)}"


def _shorten(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


_lock = threading.Lock()
_clients: dict[tuple, Any] = {}


def llm_configured() -> bool:
    return bool(settings.OPENAI_BASE_URL or settings.OPENAI_API_KEY)


def get_provider(model: str) -> Provider:
    """The provider for an agent's model: OpenAI-compatible when configured, else offline."""
    if model == OFFLINE_MODEL or not llm_configured():
        return OfflineProvider()
    key = (
        settings.OPENAI_BASE_URL,
        settings.OPENAI_API_KEY,
        settings.LLM_TIMEOUT_SECONDS,
        settings.LLM_MAX_RETRIES,
    )
    client = _clients.get(key)
    if client is None:
        with _lock:
            client = _clients.get(key)
            if client is None:
                from openai import OpenAI

                client = OpenAI(
                    base_url=settings.OPENAI_BASE_URL or None,
                    # Local servers (vLLM, Ollama, llama.cpp) take any key.
                    api_key=settings.OPENAI_API_KEY or "not-needed",
                    timeout=settings.LLM_TIMEOUT_SECONDS,
                    max_retries=settings.LLM_MAX_RETRIES,
                )
                _clients[key] = client
    return OpenAIProvider(client)
