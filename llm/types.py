"""What callers and providers exchange: a chat request, the tool calls a model asks
for, the errors a provider raises, and the provider's protocol. No client here, so web
processes and workers can import it without loading any LLM client."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

# Agent params passed through to chat completions; the rest (e.g. top_k) are ours.
COMPLETION_PARAMS = ("temperature", "top_p", "max_tokens", "presence_penalty", "frequency_penalty")


class ProviderError(Exception):
    """The provider could not produce (the rest of) an answer; str() is the reason."""


class ProviderStopped(Exception):
    """The caller asked to stop (`should_stop`): cancelled, deleted, or the run was lost.
    Raised between retries, so a stopped run makes no more calls."""


def never() -> bool:
    return False


@dataclass(frozen=True)
class ToolCallRequest:
    """A tool call the model asks for: `arguments` is the JSON text it wrote."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class ChatRequest:
    model: str
    # OpenAI chat format: [{"role": "system"|"user"|"assistant"|"tool", "content": ...}]
    messages: list[dict[str, Any]]
    params: dict[str, Any] = field(default_factory=dict)
    # The retrieved context, also inside `messages`; the offline provider answers from it.
    context: list[str] = field(default_factory=list)
    question: str = ""
    # The tools the model may call, as OpenAI function specs.
    tools: list[dict[str, Any]] = field(default_factory=list)
    # The run's deadline (time.monotonic()): a call waits at most what is left of it.
    deadline: float | None = None

    def timeout(self, default: float) -> float:
        """`default`, or what is left before the deadline if that is less."""
        if self.deadline is None:
            return default
        return max(0.1, min(default, self.deadline - time.monotonic()))


class Provider(Protocol):
    name: str

    def stream(
        self, request: ChatRequest, *, should_stop: Callable[[], bool] = never
    ) -> Iterator[str | ToolCallRequest]:
        """Text deltas of the answer, then the tool calls asked for (if any); closing the
        iterator releases the connection. `should_stop` is asked before each (re)try."""
        ...


def shorten(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
