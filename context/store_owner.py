"""The embedded vector store with several worker processes: one owns it, the others
send their store calls to it through Redis.

Qdrant's embedded engines (local mode, Edge) let one process hold a storage folder. With
no QDRANT_URL, the process that holds the **owner lease** (`LEASE_KEY`, renewed every
third of VECTOR_STORE_LEASE_SECONDS) opens the folder and uses its store directly, as a
single worker always did; it also serves `REQUESTS_KEY`, a Redis list on which every
other process's `RemoteStore` (the same API as `VectorStore`) pushes each call and waits
for the reply on a list of its own. Embedding stays where the work is: only vectors,
points and hits travel.

- **Takeover.** A lease whose holder died (SIGKILL, a lost host) ends within
  VECTOR_STORE_LEASE_SECONDS; the next call of any other process finds no lease, takes
  it, opens the folder and carries on locally, and requests still queued are served by
  it. A call whose owner changed while it waited is sent again (every store call is
  idempotent: point ids follow from their content, deletes and searches repeat). An
  owner that finds its lease taken (it was cut off longer than the lease) closes its
  store and forwards from then on.
- **Bounded.** A call no owner answers within VECTOR_STORE_FORWARD_TIMEOUT_SECONDS ends
  in `StoreUnavailable`, saying who holds the lease.
- **Tenants.** The wire carries tenant scopes as ids only; the owner makes them again
  with `TenantScope`'s own constructors (which check them) and calls its `VectorStore`,
  which refuses any point operation without one. Only the calls in `FORWARDED` are
  served.
- **The folder.** The owner also holds an flock on the folder (qdrant_store), so two
  processes on one folder never both write it, whatever Redis says. Takeover by a
  process on another host opens *that* host's folder: context must then be on storage
  both reach, or use QDRANT_URL (the README's "Several workers").
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import redis
from django.conf import settings

from common.redis import get_redis

from .scopes import ContextHit, ContextPoint, TenantScope, TenantScopeRequired

logger = logging.getLogger(__name__)

LEASE_KEY = "uws:vectorstore:owner"
REQUESTS_KEY = "uws:vectorstore:requests"
REPLY_PREFIX = "uws:vectorstore:reply:"
# A reply nobody took (its caller gave up) goes after this long.
REPLY_TTL_MS = 60_000
# How long a waiting call listens before it looks at the lease again.
WAIT_SLICE_SECONDS = 1.0

# The store's calls that other processes may send to the owner.
FORWARDED = frozenset(
    {
        "upsert",
        "search",
        "count",
        "delete",
        "delete_verified",
        "forget",
        "delete_points",
        "scroll",
        "agent_collection_dim",
        "drop_agent_collection",
        "contexts",
        "shared_collections",
        "agent_collections",
        "optimize",
        "purge_deleted",
    }
)
# Errors an owner sends back that the caller raises as themselves.
_ERRORS: dict[str, type[Exception]] = {
    e.__name__: e for e in (TenantScopeRequired, ValueError, LookupError, TypeError)
}

# Renew the lease if it is ours, or take it back if it went (flushed, or expired while
# this process still holds the folder). KEYS: lease. ARGV: owner id, ms. 1, or 0 when
# another process holds it.
RENEW = """
local holder = redis.call('GET', KEYS[1])
if holder == false then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""
# Send a call to the lease's holder in one round trip: pushed unless there is no holder,
# or it is the one the call was sent to already. KEYS: lease, requests. ARGV: the call,
# the holder it went to ("" if none). Returns the holder (nil: none).
SEND = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[2] then redis.call('RPUSH', KEYS[2], ARGV[1]) end
return holder
"""
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class StoreUnavailable(RuntimeError):
    """No process serves the embedded vector store (or it failed the call)."""


class FolderHeld(RuntimeError):
    """Another process holds the folder's flock but not the lease: an owner whose lease
    Redis lost (its renewal takes it back), or a process that serves no calls."""


# --- the wire: JSON with tags for the store's own types -------------------------------


def encode(value: Any) -> Any:
    if isinstance(value, TenantScope):
        agent = value.agent_id.hex if value.agent_id else None
        return {"~scope": [value.user_id, value.project_id.hex, agent]}
    if isinstance(value, ContextPoint):
        return {"~point": [value.id, value.vector, encode(value.payload)]}
    if isinstance(value, ContextHit):
        return {"~hit": [value.id, value.score, value.text, encode(value.payload)]}
    if isinstance(value, uuid.UUID):
        return {"~uuid": value.hex}
    if isinstance(value, set | frozenset):
        return {"~set": [encode(v) for v in value]}
    if isinstance(value, list | tuple):
        if all(type(v) is float for v in value):  # a vector: nothing to tag, as it is
            return value
        return [encode(v) for v in value]
    if isinstance(value, dict):
        out = {str(k): encode(v) for k, v in value.items()}
        # A payload's own one-key dict that looks like a tag travels wrapped.
        return {"~dict": out} if len(out) == 1 and next(iter(out)).startswith("~") else out
    return value


def decode(value: Any) -> Any:
    if isinstance(value, list):
        if all(type(v) is float for v in value):
            return value
        return [decode(v) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        tag, inner = next(iter(value.items()))
        if tag == "~scope":
            user_id, project_id, agent_id = inner
            if agent_id is None:
                return TenantScope.project(user_id=user_id, project_id=project_id)
            return TenantScope.agent(user_id=user_id, project_id=project_id, agent_id=agent_id)
        if tag == "~point":
            return ContextPoint(str(inner[0]), [float(x) for x in inner[1]], decode(inner[2]))
        if tag == "~hit":
            return ContextHit(str(inner[0]), float(inner[1]), str(inner[2]), decode(inner[3]))
        if tag == "~uuid":
            return uuid.UUID(inner)
        if tag == "~set":
            return {decode(v) for v in inner}
        if tag == "~dict":
            return {k: decode(v) for k, v in inner.items()}
    return {k: decode(v) for k, v in value.items()}


def answer(store: Any, request: dict) -> dict:
    """Run one forwarded call on the owner's store: {"ok": result} or {"error": ...}."""
    op = request.get("op")
    try:
        if op not in FORWARDED:
            raise ValueError(f"{op!r} is not a call the vector store serves")
        args, kwargs = decode(request["args"]), decode(request["kwargs"])
        if not isinstance(args, list) or not isinstance(kwargs, dict):
            raise ValueError("a call's arguments are a list and a dict")
        return {"ok": encode(getattr(store, op)(*args, **kwargs))}
    except Exception as exc:
        return {"error": type(exc).__name__, "message": str(exc)}


# --- the owner -------------------------------------------------------------------------


def _lease_ms() -> int:
    return max(int(settings.VECTOR_STORE_LEASE_SECONDS * 1000), 1000)


class StoreOwner:
    """What the owning process runs beside its store: the lease's renewal and
    VECTOR_STORE_SERVE_THREADS threads answering the other processes' calls."""

    def __init__(self, store: Any, owner_id: str, on_lost: Callable[[], None]) -> None:
        self.store = store
        self.id = owner_id
        self._on_lost = on_lost
        self._stop = threading.Event()
        # Calls being answered now: the store closes only once they are done.
        self._answering = 0
        self._idle = threading.Condition()
        self._threads = [threading.Thread(target=self._renew, name="store-lease", daemon=True)]
        self._threads += [
            threading.Thread(target=self._serve, name=f"store-serve-{i}", daemon=True)
            for i in range(max(settings.VECTOR_STORE_SERVE_THREADS, 1))
        ]

    def start(self) -> StoreOwner:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        """Stop serving: the calls being answered end first; a thread still listening
        gives back what it takes (the next owner answers it), so closing never waits
        for a listen to end."""
        self._stop.set()
        with self._idle:
            self._idle.wait_for(lambda: self._answering == 0, timeout=30)
        try:
            get_redis().eval(RELEASE, 1, LEASE_KEY, self.id)
        except redis.RedisError:
            logger.warning("vector store: could not release the owner lease", exc_info=True)

    def _renew(self) -> None:
        lost = 0
        while not self._stop.wait(settings.VECTOR_STORE_LEASE_SECONDS / 3):
            try:
                lost = (
                    0 if get_redis().eval(RENEW, 1, LEASE_KEY, self.id, _lease_ms()) else lost + 1
                )
            except redis.RedisError:
                logger.warning("vector store: could not renew the owner lease", exc_info=True)
            if lost >= 2:  # not a taker's passing try: another process owns the store now
                logger.error(
                    "vector store: %s took the owner lease over while this process (%s) "
                    "was cut off; this process closes its store and sends its calls there",
                    get_redis().get(LEASE_KEY),
                    self.id,
                )
                self._on_lost()
                return

    def _serve(self) -> None:
        while not self._stop.is_set():
            client = get_redis()
            try:
                item = client.blpop([REQUESTS_KEY], timeout=WAIT_SLICE_SECONDS)
            except redis.RedisError:
                self._stop.wait(WAIT_SLICE_SECONDS)
                continue
            if item is None:
                continue
            with self._idle:
                stopping = self._stop.is_set()
                if not stopping:
                    self._answering += 1
            if stopping:  # closing: the next owner answers it
                client.lpush(REQUESTS_KEY, item[1])
                return
            try:
                self._answer(client, item[1])
            except Exception:
                logger.exception("vector store: could not answer a forwarded call")
            finally:
                with self._idle:
                    self._answering -= 1
                    self._idle.notify_all()

    def _answer(self, client: redis.Redis, raw: str) -> None:
        request = json.loads(raw)
        if request.get("deadline", 0) < time.time():
            return  # its caller gave up
        reply = REPLY_PREFIX + uuid.UUID(str(request["id"])).hex
        pipe = client.pipeline(transaction=False)
        pipe.rpush(reply, json.dumps(answer(self.store, request)))
        pipe.pexpire(reply, REPLY_TTL_MS)
        pipe.execute()


def _owner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def take_store(on_lost: Callable[[], None]) -> Any | None:
    """Become the store's owner if no process is: take the lease, open the folder and
    serve. Returns the open store, or None when another process owns it; raises
    FolderHeld when another process holds the folder without the lease, and the
    engines' RuntimeError when one of them is held by a process outside this scheme
    (a tool holding a shard). With Redis down, the folder alone decides (a single
    worker never needs Redis for its store); the renewal takes the lease once Redis is
    back. `on_lost`: what the owner calls once another process took its lease (it was
    cut off longer than the lease): the process closes its store and forwards."""
    # Here, not at the top: the engines are heavy (see vectorstore.get_vector_store).
    from .qdrant_store import open_store

    owner_id = _owner_id()
    try:
        if not get_redis().set(LEASE_KEY, owner_id, nx=True, px=_lease_ms()):
            return None
    except redis.RedisError:
        logger.warning("vector store: Redis unreachable; opening the embedded store alone")
    store = None
    try:
        store = open_store()
        store.open()
    except RuntimeError as exc:
        if store is not None:
            store.close()  # lets the folder's flock go
        with contextlib.suppress(redis.RedisError):
            get_redis().eval(RELEASE, 1, LEASE_KEY, owner_id)
        if store is None and "already accessed" in str(exc):
            raise FolderHeld(str(exc)) from exc
        raise
    owner = StoreOwner(store, owner_id, on_lost).start()
    store.on_close.append(owner.stop)
    logger.info("vector store: this process (%s) owns the embedded store", owner_id)
    return store


def embedded_store(on_lost: Callable[[], None]) -> Any:
    """This process's embedded store: its own when it can own it, else a RemoteStore.
    `on_lost`: see take_store (vectorstore forgets the process's store)."""
    try:
        return take_store(on_lost) or RemoteStore(on_lost)
    except FolderHeld:
        return RemoteStore(on_lost)


# --- every other process -----------------------------------------------------------------


class RemoteStore:
    """`VectorStore`'s API over the owner: each call in FORWARDED is sent to it and
    waited for. Once no process owns the store, the next call takes it over and this
    store serves from the process's own from then on."""

    def __init__(self, on_lost: Callable[[], None]) -> None:
        self.layout = settings.VECTOR_LAYOUT
        self._on_lost = on_lost
        self._local: Any = None
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        if name not in FORWARDED:
            raise AttributeError(name)

        def call(*args: Any, **kwargs: Any) -> Any:
            return self._call(name, args, kwargs)

        return call

    @property
    def local(self) -> Any:
        """The store this process took over, or None while another owns it."""
        return self._local

    def open(self) -> RemoteStore:
        """Check that some process serves the store: the lease's holder, or this one
        (it takes the store over when no process holds the lease)."""
        if self._local is None and get_redis().get(LEASE_KEY) is None:
            self._take_over()
        return self

    def sparse_reindex(self, **_: Any) -> dict[str, int]:
        raise StoreUnavailable(
            "another process owns the embedded vector store: stop the workers before "
            "`manage.py context_sparse_reindex` (it rebuilds collections in place)"
        )

    def close(self) -> None:
        with self._lock:
            local, self._local = self._local, None
        if local is not None:
            local.close()

    def _take_over(self) -> Any:
        with self._lock:
            if self._local is None:
                self._local = take_store(self._on_lost)
                if self._local is not None:
                    logger.warning("vector store: this process took the embedded store over")
            return self._local

    def _call(self, op: str, args: tuple, kwargs: dict) -> Any:
        local = self._local
        if local is not None:
            return getattr(local, op)(*args, **kwargs)
        timeout = settings.VECTOR_STORE_FORWARD_TIMEOUT_SECONDS
        request_id = uuid.uuid4().hex
        reply = REPLY_PREFIX + request_id
        body = json.dumps(
            {
                "id": request_id,
                "op": op,
                "args": encode(list(args)),
                "kwargs": encode(kwargs),
                "deadline": time.time() + timeout,
            }
        )
        client = get_redis()
        deadline = time.monotonic() + timeout
        sent_to: str | None = None
        held_since: float | None = None
        while True:
            holder = client.get(LEASE_KEY) if sent_to else None
            if sent_to is None or (holder is not None and holder != sent_to):
                # The first send, or again to an owner that changed since (it may have
                # died holding the call).
                holder = client.eval(SEND, 2, LEASE_KEY, REQUESTS_KEY, body, sent_to or "")
            if holder is None:
                try:
                    if self._take_over() is not None:
                        client.delete(reply)
                        return getattr(self._local, op)(*args, **kwargs)
                except FolderHeld as exc:
                    # An owner takes its lease back within a third of it: past a whole
                    # lease, the holder is a process that serves no calls.
                    held_since = held_since or time.monotonic()
                    if time.monotonic() - held_since > settings.VECTOR_STORE_LEASE_SECONDS:
                        raise StoreUnavailable(f"{exc} (it holds no owner lease)") from exc
            sent_to = holder or sent_to
            left = deadline - time.monotonic()
            if left <= 0:
                raise StoreUnavailable(
                    f"no process answered a vector store call ({op}) within {timeout:g}s "
                    f"(owner lease: {holder or 'none'}); see VECTOR_STORE_FORWARD_TIMEOUT_"
                    "SECONDS, or set QDRANT_URL"
                )
            if sent_to is None:  # not sent yet: an owner is on its way (its lease)
                time.sleep(min(0.1, left))
                continue
            got = client.blpop([reply], timeout=min(WAIT_SLICE_SECONDS, left))
            if got is not None:
                return self._result(op, holder, json.loads(got[1]))

    @staticmethod
    def _result(op: str, holder: str | None, response: dict) -> Any:
        if "error" not in response:
            return decode(response["ok"])
        error = _ERRORS.get(response["error"])
        if error is not None:
            raise error(response["message"])
        raise StoreUnavailable(
            f"the vector store's owner ({holder}) failed {op}: "
            f"{response['error']}: {response['message']}"
        )
