"""LLM providers: any OpenAI-compatible endpoint, or the offline provider when none is configured.

A provider turns a prompt into a stream of text deltas, followed by the tool calls the
model asks for (`ToolCallRequest`), if it asks for any. Whatever goes wrong on the way
(connection refused, HTTP error, a stalled stream past the timeout) surfaces as
`ProviderError`, so the caller can end the message in error instead of leaving it open.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator

from django.conf import settings

from governance.providers import ModelNotAllowed

from .types import (  # noqa: F401  (re-exported: the providers' API is one module)
    COMPLETION_PARAMS,
    ChatRequest,
    Provider,
    ProviderError,
    ProviderStopped,
    ToolCallRequest,
    never,
    shorten,
)

OFFLINE_MODEL = "offline"


class OfflineProvider:
    """Answers from the agent's retrieved context, without any model, and says so.

    With the `search_context` tool, it uses it as a model would, deterministically: a
    message holding a question is searched for first, and answered from what the search
    returned."""

    name = "offline"
    INTRO = (
        "This is the offline provider: no language model is configured, "
        "so this answer is built from the agent's stored context."
    )

    def tool_calls(self, request: ChatRequest) -> list[ToolCallRequest]:
        names = {tool["function"]["name"] for tool in request.tools}
        searched = any(m.get("role") == "tool" for m in request.messages)
        if "search_context" in names and not searched and "?" in request.question:
            arguments = json.dumps({"query": request.question}, ensure_ascii=False)
            return [ToolCallRequest("offline-search-1", "search_context", arguments)]
        return []

    def answer(self, request: ChatRequest) -> str:
        intro = self.INTRO
        results = [m["content"] for m in request.messages if m.get("role") == "tool"]
        if results:
            lines = [f"{intro} Its search_context tool found:"]
            lines += [f"- {text}" for result in results for text in _found(result)]
            return "\n".join(lines)
        if not request.context:
            return (
                f"{intro} Nothing in the agent's context matches your message "
                f"({shorten(request.question, 200)!r})."
            )
        lines = [f"{intro} The most relevant context I hold:"]
        for i, text in enumerate(request.context, 1):
            lines.append(f"{i}. {_quoted(text)}")
        return "\n".join(lines)

    def stream(
        self, request: ChatRequest, *, should_stop: Callable[[], bool] = never
    ) -> Iterator[str | ToolCallRequest]:
        calls = self.tool_calls(request)
        if calls:
            yield from calls
            return
        # A few words per delta, like a model would stream them.
        words = re.findall(r"\S+\s*", self.answer(request))
        for i in range(0, len(words), 4):
            yield "".join(words[i : i + 4])


def _quoted(text: str, limit: int = 500) -> str:
    """Stored context as the offline provider quotes it. A remembered exchange holds an
    earlier offline answer, which quotes the context of its own turn: quoted whole, the
    answers would nest one level deeper every turn. Its quote stops where it began."""
    cut = text.find(OfflineProvider.INTRO)
    if cut >= 0:
        text = text[:cut] + "(an earlier offline answer)"
    return shorten(text, limit)


def _found(result: str) -> list[str]:
    """A tool result as lines to quote: the texts of search_context's hits (its result
    is JSON), else the result itself."""
    try:
        hits = json.loads(result)
    except ValueError:
        return [_quoted(result)]
    if isinstance(hits, list) and all(isinstance(h, dict) and "text" in h for h in hits):
        return [_quoted(str(h["text"])) for h in hits] or ["nothing"]
    return [_quoted(result)]


def llm_configured() -> bool:
    return bool(settings.OPENAI_BASE_URL or settings.OPENAI_API_KEY)


def provider_warm() -> None:
    """Load what a process's first provider call would: the openai client's modules and
    the deployment's client (~0.6 s of CPU). A worker does it as it starts, so its first
    runs do not all wait on the import lock for it (see chat.receivers)."""
    from .openai_api import openai_client  # heavy: see get_provider

    if llm_configured():
        openai_client()


def get_provider(model: str, llm=None) -> Provider:
    """The provider for an agent's model: OpenAI-compatible when configured, else offline.
    `llm`: the project's provider settings (governance.providers.ProjectLLM), whose
    endpoint, key and model rules come before the deployment's."""
    if llm is not None:
        try:
            llm.model_for(model, settings.LLM_DEFAULT_MODEL)  # before anything is called
        except ModelNotAllowed as exc:
            raise ProviderError(str(exc)) from None
    own_endpoint = llm is not None and llm.own_endpoint
    if model == OFFLINE_MODEL or not (llm_configured() or own_endpoint):
        return OfflineProvider()
    # Here, not at the top: the openai client costs ~0.5 s to import, and web processes
    # import this module (requests, errors) but never call a provider.
    from .openai_api import OpenAIProvider, openai_client, project_openai_client

    if not own_endpoint:
        return OpenAIProvider(openai_client(), llm=llm)
    if not llm.base_url:
        # The deployment's endpoint (the operator's) with the project's own key.
        client = project_openai_client(base_url=settings.OPENAI_BASE_URL, api_key=llm.api_key)
        return OpenAIProvider(client, llm=llm, own_key=llm.api_key)
    # The project's own endpoint: the deployment's key never goes there (its own key, or
    # none), and every connection leaves through the egress guard.
    client = project_openai_client(base_url=llm.base_url, api_key=llm.api_key, guarded=True)
    return OpenAIProvider(client, llm=llm, project_endpoint=True, own_key=llm.api_key)
