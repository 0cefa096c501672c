"""The AgentBus: one Celery queue per project, and a shared worker pool whose cost
follows the *active* projects only.

Why: kombu's Redis transport sends one BRPOP over every key of every queue a worker
follows, after every message, so a worker that followed every project's queue would
slow down with every project that ever existed (see shared/DESIGN.md). Here:

- Producers mark a project's queue active (a sorted set, queue -> last publish time)
  *before* publishing. A queue that was not active yet is announced to the workers
  (`agentbus_follow` broadcast), which start consuming it at once.
- The reaper (`workspaces.reap_idle_queues`, beat) retires queues that are empty and
  idle for `AGENTBUS_QUEUE_IDLE_SECONDS`: a Lua script checks length and last use
  and removes the queue from the set in one step, so a producer that publishes at
  that moment either keeps the queue (fresh score) or re-adds it and re-announces it.
- Broadcasts on Redis are fire-and-forget, so every shared worker also reconciles what
  it consumes with the active set every `AGENTBUS_RECONCILE_SECONDS`
  (workspaces/worker.py). A missed or reordered broadcast costs seconds, never a task.
- Deleting a project tombstones it; `AgentBusTask` skips (and acknowledges) a task of a
  tombstoned project before it runs, including messages restored from `unacked`.

Messages go straight to the queue (nameless exchange, routing key = queue name), so
Redis holds nothing per project but the queue's list while it has messages.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Iterable
from typing import Any

import redis
from celery import Task
from celery.exceptions import Ignore
from celery.result import AsyncResult
from django.conf import settings

from .queues import PROJECT_QUEUE_PREFIX, direct_queue, is_project_queue, project_queue
from .redis import get_redis, scoped

logger = logging.getLogger(__name__)

# Bus-wide keys live beside the broker's queues (the Lua scripts read both), under the
# `uws:bus:` namespace: never under a workspace prefix, which teardown wipes.
ACTIVE_KEY = "uws:bus:active"
# Queues taken out of the active set (queue -> when), watched for messages put back.
RETIRED_KEY = "uws:bus:retired"
# Present while a full keyspace scan for stranded queues is not due.
FULL_SCAN_KEY = "uws:bus:rescue-scan"
TOMBSTONE_PREFIX = "uws:bus:tombstone:"
# Workspace-relative key (under the workspace prefix) of the agents registered on the bus.
AGENTS_KEY = "bus:agents"

# Remote control commands the shared workers answer (workspaces/worker.py).
FOLLOW_COMMAND = "agentbus_follow"
UNFOLLOW_COMMAND = "agentbus_unfollow"
STATUS_COMMAND = "agentbus_status"

# Mark a queue active unless its project is tombstoned.
# KEYS: active set, tombstone key. ARGV: now, queue.
# Returns -1 (tombstoned), 1 (newly active) or 0 (was active; last use refreshed).
_MARK_ACTIVE = """
if redis.call('EXISTS', KEYS[2]) == 1 then return -1 end
return redis.call('ZADD', KEYS[1], ARGV[1], ARGV[2])
"""

# Retire queues that are empty and unused since the cutoff, atomically, and note them
# as retired. KEYS: active set, retired set, then `steps` list keys per queue.
# ARGV: cutoff, steps, now, queue names. Returns the retired queue names.
_RETIRE_IDLE = """
local cutoff = tonumber(ARGV[1])
local steps = tonumber(ARGV[2])
local retired = {}
for i = 4, #ARGV do
  local queue = ARGV[i]
  local score = redis.call('ZSCORE', KEYS[1], queue)
  if score and tonumber(score) <= cutoff then
    local empty = true
    local first = 3 + (i - 4) * steps
    for k = first, first + steps - 1 do
      if redis.call('LLEN', KEYS[k]) > 0 then empty = false end
    end
    if empty then
      redis.call('ZREM', KEYS[1], queue)
      redis.call('ZADD', KEYS[2], ARGV[3], queue)
      retired[#retired + 1] = queue
    end
  end
end
return retired
"""


def _project_hex(project_id: uuid.UUID | str) -> str:
    return uuid.UUID(str(project_id)).hex


class AgentBus:
    """The AgentBus of this process (see the module docstring). Holds no per-project
    state in memory; everything lives in Redis, so any process sees the same bus."""

    def __init__(self) -> None:
        options = settings.CELERY_BROKER_TRANSPORT_OPTIONS or {}
        self._steps: list[int] = sorted(options.get("priority_steps") or [0])
        self._sep: str = options.get("sep", "\x06\x16")
        self._keyprefix: str = options.get("global_keyprefix", "") or ""
        self._unacked_key: str = self._keyprefix + options.get("unacked_key", "unacked")
        self._own_client: redis.Redis | None = None
        self._lock = threading.Lock()
        self._scripts: dict[tuple[int, str], Any] = {}

    # --- Redis -------------------------------------------------------------------
    def redis(self) -> redis.Redis:
        """The broker's Redis (the queues, the active set and tombstones live there)."""
        if settings.CELERY_BROKER_URL == settings.REDIS_URL:
            return get_redis()
        if self._own_client is None:
            with self._lock:
                if self._own_client is None:
                    self._own_client = redis.Redis.from_url(
                        settings.CELERY_BROKER_URL,
                        decode_responses=True,
                        health_check_interval=30,
                        socket_connect_timeout=5,
                        socket_timeout=30,
                    )
        return self._own_client

    def _script(self, source: str):
        # Scripts are bound to the client they were registered on (it may be replaced).
        client = self.redis()
        key = (id(client), source)
        script = self._scripts.get(key)
        if script is None:
            script = self._scripts[key] = client.register_script(source)
        return script

    def queue_keys(self, queue: str) -> list[str]:
        """The Redis lists holding one queue's messages (one per priority step)."""
        base = self._keyprefix + queue
        return [f"{base}{self._sep}{p}" if p else base for p in self._steps]

    # --- Publishing -----------------------------------------------------------------
    def publish(
        self,
        task: Task,
        *,
        user_id: int,
        project_id: uuid.UUID,
        kwargs: dict | None = None,
        task_id: str | None = None,
    ) -> str:
        """Put `task` on the project's queue; returns the task id.

        The queue is marked active first (and announced to the shared workers if it
        was not active), so the message never lands in a queue the pool has no reason
        to follow. A task of a deleted (tombstoned) project is not sent: it would be
        skipped by the worker anyway; the id is still returned.
        """
        return self.send(
            task, user_id=user_id, project_id=project_id, kwargs=kwargs, task_id=task_id
        ).id

    def send(
        self,
        task: Task,
        *,
        user_id: int,
        project_id: uuid.UUID | str,
        kwargs: dict | None = None,
        task_id: str | None = None,
        **options: Any,
    ) -> AsyncResult:
        """`publish` with Celery's execution options (countdown, eta, ...) and the
        AsyncResult; AgentBusTask.apply_async comes through here."""
        if not isinstance(task, AgentBusTask):
            raise TypeError(
                f"{task!r} is not an AgentBusTask: agent tasks must skip tombstoned projects"
            )
        payload = dict(kwargs or {})
        payload["user_id"] = int(user_id)
        payload["project_id"] = str(uuid.UUID(str(project_id)))
        queue = project_queue(project_id)
        task_id = task_id or str(uuid.uuid4())
        if self.mark_active(project_id) < 0:
            logger.info(
                "not sending %s[%s]: project %s was deleted", task.name, task_id, project_id
            )
            return AsyncResult(task_id, app=task.app)
        for name in ("queue", "exchange", "routing_key", "declare"):
            options.pop(name, None)
        return Task.apply_async(
            task,
            kwargs=payload,
            task_id=task_id,
            queue=direct_queue(queue),
            declare=[],
            **options,
        )

    def mark_active(self, project_id: uuid.UUID | str) -> int:
        """Record that the project's queue is in use now; announce it if it was not.

        Returns 1 if the queue became active, 0 if it already was, -1 if the project is
        tombstoned (then nothing is marked).
        """
        queue = project_queue(project_id)
        result = int(
            self._script(_MARK_ACTIVE)(
                keys=[ACTIVE_KEY, TOMBSTONE_PREFIX + _project_hex(project_id)],
                args=[time.time(), queue],
            )
        )
        if result == 1:
            self._broadcast(FOLLOW_COMMAND, [queue], swallow=True)
        return result

    def _broadcast(self, command: str, queues: list[str], *, swallow: bool) -> None:
        from config.celery_app import app

        try:
            app.control.broadcast(command, arguments={"queues": queues}, reply=False)
        except Exception:
            if not swallow:
                raise
            # The workers' periodic reconcile converges on the active set anyway.
            logger.warning("could not broadcast %s %s", command, queues, exc_info=True)

    # --- Bookkeeping of registered agents (under the workspace prefix) -----------
    def register_agent(self, *, user_id: int, project_id: uuid.UUID, agent_id: str) -> None:
        scoped(user_id, project_id).sadd(AGENTS_KEY, str(agent_id))

    def deregister_agent(self, *, user_id: int, project_id: uuid.UUID, agent_id: str) -> None:
        scoped(user_id, project_id).srem(AGENTS_KEY, str(agent_id))

    def registered_agents(self, *, user_id: int, project_id: uuid.UUID) -> set[str]:
        return set(scoped(user_id, project_id).smembers(AGENTS_KEY))

    # --- Deletion -----------------------------------------------------------------
    def tombstone_project(self, project_id: uuid.UUID | str) -> None:
        """Stop every task of the project that is still queued or will be restored."""
        ttl = int(settings.AGENTBUS_TOMBSTONE_SECONDS)
        self.redis().set(TOMBSTONE_PREFIX + _project_hex(project_id), "1", ex=ttl)

    def is_tombstoned(self, project_id: uuid.UUID | str) -> bool:
        return bool(self.redis().exists(TOMBSTONE_PREFIX + _project_hex(project_id)))

    def retire_project(self, *, user_id: int, project_id: uuid.UUID) -> int:
        """Take the project off the bus: it leaves the active set, the workers stop
        consuming its queue, the queue is purged. Returns how many messages were
        purged. Idempotent; raises if Redis or the broker is down."""
        queue = project_queue(project_id)
        client = self.redis()
        pipe = client.pipeline(transaction=True)
        pipe.zrem(ACTIVE_KEY, queue)
        pipe.zadd(RETIRED_KEY, {queue: time.time()})
        pipe.execute()
        self._broadcast(UNFOLLOW_COMMAND, [queue], swallow=False)
        purged = self._purge(client, queue)
        scoped(user_id, project_id).delete(AGENTS_KEY)
        logger.info("retired %s (%d queued messages purged)", queue, purged)
        return purged

    def _purge(self, client: redis.Redis, queue: str) -> int:
        pipe = client.pipeline(transaction=True)
        for key in self.queue_keys(queue):
            pipe.llen(key)
            pipe.delete(key)
        return sum(pipe.execute()[::2])

    # --- Reading --------------------------------------------------------------------
    def queue_depth(self, project_id: uuid.UUID | str) -> int:
        """Messages waiting in the project's queue (not counting ones being run)."""
        return self._depth(self.redis(), project_queue(project_id))

    def active_queues(self) -> list[str]:
        """The project queues the shared pool follows (oldest use first)."""
        return self.redis().zrange(ACTIVE_KEY, 0, -1)

    def active_among(self, queues: Iterable[str]) -> set[str]:
        """Which of `queues` are active (one round trip)."""
        queues = list(queues)
        if not queues:
            return set()
        scores = self.redis().zmscore(ACTIVE_KEY, queues)
        return {q for q, s in zip(queues, scores, strict=True) if s is not None}

    # --- Maintenance (the reaper task) --------------------------------------------
    def reap_idle_queues(self, *, idle_seconds: float | None = None, batch: int = 500) -> list[str]:
        """Retire active queues that are empty, have no message being run, and were
        not published to for `idle_seconds`; tell the workers. Returns their names."""
        if idle_seconds is None:
            idle_seconds = settings.AGENTBUS_QUEUE_IDLE_SECONDS
        client = self.redis()
        cutoff = time.time() - idle_seconds
        in_flight = self._queues_in_flight(client)
        retired: list[str] = []
        offset = 0
        while True:
            candidates = client.zrangebyscore(ACTIVE_KEY, "-inf", cutoff, start=offset, num=batch)
            if not candidates:
                break
            offset += len(candidates)
            idle = [q for q in candidates if q not in in_flight]
            if not idle:
                continue
            keys = [ACTIVE_KEY, RETIRED_KEY] + [k for q in idle for k in self.queue_keys(q)]
            args = [cutoff, len(self._steps), time.time(), *idle]
            done = self._script(_RETIRE_IDLE)(keys=keys, args=args)
            retired.extend(done)
            offset -= len(done)  # retired members left the set: the window shifts back
        if retired:
            logger.info("retired %d idle queues", len(retired))
            self._broadcast(UNFOLLOW_COMMAND, retired, swallow=True)
        return retired

    def _queues_in_flight(self, client: redis.Redis) -> set[str]:
        """Project queues with a message delivered to a worker and not acknowledged yet
        (kombu keeps those in `unacked`; it puts them back if the worker dies)."""
        queues: set[str] = set()
        for _tag, raw in client.hscan_iter(self._unacked_key, count=500):
            try:
                _payload, exchange, routing_key = json.loads(raw)
            except (TypeError, ValueError):
                continue
            if not exchange and routing_key and is_project_queue(routing_key):
                queues.add(routing_key)
        return queues

    def rescue_stranded_queues(self, *, full_scan: bool | None = None) -> list[str]:
        """Re-activate project queues that hold messages but left the active set.

        A message can come back to a retired queue: kombu puts a message back when the
        worker holding it dies, at once or after the visibility timeout. So queues
        retired within twice the visibility timeout are checked (one LLEN each). The
        whole keyspace is scanned for stranded queues too, at most once every
        AGENTBUS_FULL_RESCUE_SECONDS (or when `full_scan`), in case the active set
        itself was lost. Queues of tombstoned projects are purged instead. Returns the
        names of the re-activated queues.
        """
        client = self.redis()
        options = settings.CELERY_BROKER_TRANSPORT_OPTIONS or {}
        window = 2 * float(options.get("visibility_timeout", 3600))
        client.zremrangebyscore(RETIRED_KEY, "-inf", time.time() - window)
        candidates = set(client.zrange(RETIRED_KEY, 0, -1))
        if full_scan is None:
            every = int(settings.AGENTBUS_FULL_RESCUE_SECONDS)
            full_scan = bool(client.set(FULL_SCAN_KEY, "1", nx=True, ex=every))
        if full_scan:
            pattern = self._keyprefix + PROJECT_QUEUE_PREFIX + "*"
            for key in client.scan_iter(match=pattern, count=1000, _type="list"):
                queue = key[len(self._keyprefix) :].split(self._sep, 1)[0]
                if is_project_queue(queue):
                    candidates.add(queue)
        candidates -= self.active_among(candidates)
        stranded = [q for q in sorted(candidates) if self._depth(client, q)]
        rescued = []
        for queue in stranded:
            project_id = queue[len(PROJECT_QUEUE_PREFIX) :]
            if self.is_tombstoned(project_id):
                self._purge(client, queue)
            elif self.mark_active(project_id) >= 0:
                client.zrem(RETIRED_KEY, queue)
                rescued.append(queue)
        if rescued:
            logger.warning(
                "re-activated %d queues holding messages: %s", len(rescued), rescued[:10]
            )
        return rescued

    def _depth(self, client: redis.Redis, queue: str) -> int:
        pipe = client.pipeline(transaction=False)
        for key in self.queue_keys(queue):
            pipe.llen(key)
        return sum(pipe.execute())


_bus: AgentBus | None = None
_bus_lock = threading.Lock()


def get_agent_bus() -> AgentBus:
    """The AgentBus of this process."""
    global _bus
    if _bus is None:
        with _bus_lock:
            if _bus is None:
                _bus = AgentBus()
    return _bus


class AgentBusTask(Task):
    """Base class of every agent task.

    `task.delay(user_id=..., project_id=..., ...)` (or apply_async, retry, a signature)
    goes to the project's queue through the AgentBus. Before the body runs, a task of
    a tombstoned project is skipped: logged, acknowledged, state IGNORED. That holds for
    messages restored from `unacked` after a crash too, since they run through here.
    Runs are at-least-once (acks_late, a worker lost mid-task gives the message back),
    so task bodies must be idempotent.
    """

    acks_late = True
    reject_on_worker_lost = True

    def apply_async(self, args=None, kwargs=None, task_id=None, **options):
        if args:
            raise TypeError(f"{self.name} takes keyword arguments only")
        kwargs = dict(kwargs or {})
        try:
            user_id, project_id = kwargs.pop("user_id"), kwargs.pop("project_id")
        except KeyError as exc:
            raise TypeError(f"{self.name} needs user_id and project_id") from exc
        return get_agent_bus().send(
            self, user_id=user_id, project_id=project_id, kwargs=kwargs, task_id=task_id, **options
        )

    def __call__(self, *args, **kwargs):
        project_id = kwargs.get("project_id")
        if project_id is not None and get_agent_bus().is_tombstoned(project_id):
            logger.info(
                "skipping %s[%s]: project %s was deleted", self.name, self.request.id, project_id
            )
            raise Ignore()
        return super().__call__(*args, **kwargs)
