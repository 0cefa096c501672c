"""The active set: which project queues the shared worker pool follows.

kombu's Redis transport sends one BRPOP over every key of every queue a worker follows,
after every message, so a pool that followed every project's queue would slow down with
every project that ever existed. Instead:

- Producers mark a project's queue active (a sorted set, queue -> last publish time)
  *before* publishing (`mark_active`). A queue that was not active yet is announced to
  the workers (`agentbus_follow` broadcast), which start consuming it at once.
- The reaper (`reap_idle_queues`, beat) retires queues that are empty, have no message
  being run, and idle for AGENTBUS_QUEUE_IDLE_SECONDS: a Lua script checks length and
  last use and removes the queue from the set in one step, so a producer publishing at
  that moment either keeps the queue (fresh score) or re-adds and re-announces it.
- Broadcasts on Redis are fire-and-forget, so every shared worker also reconciles what
  it consumes with the active set every AGENTBUS_RECONCILE_SECONDS (agentbus.worker):
  a missed or reordered broadcast costs seconds, never a task.
- `rescue_stranded_queues` re-activates a retired queue a message came back to.
- Which active queues hold work is the ready list (agentbus.transport): publishing
  lists a queue, shared workers take from it. `sweep_ready` lists again, every
  AGENTBUS_READY_SWEEP_SECONDS, active queues that hold messages the ready list does not
  know of (sent around `publish`, or put back by kombu's own channel).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import redis
from celery import current_app
from celery.signals import task_received
from django.conf import settings

from common.budget import Budget
from common.redis import broker_redis

from .broker import (
    AMQP_QUEUES_KEY,
    amqp_delete,
    amqp_depth,
    amqp_depths,
    amqp_known_queues,
    uses_amqp,
)
from .guard import project_gone, tombstone_key
from .keys import (
    ACTIVE_KEY,
    FLOW_PARKED_KEY,
    FULL_SCAN_KEY,
    READY_SWEEP_KEY,
    RETIRED_KEY,
    WORKERS_KEY,
)
from .queues import PROJECT_QUEUE_PREFIX, project_id_from_queue, project_queue
from .transport import (
    HEARTBEAT,
    all_lane_keys,
    flow_control_on,
    forget_flow,
    keys_per_project_queue,
    lane_base,
    lane_keys,
    list_if_waiting,
    queue_key_pattern,
    queue_of_key,
    redis_time,
    run_script,
    unacked_queues,
    unlist,
)

logger = logging.getLogger(__name__)
# This worker's current connection to the broker: a worker restarted under the same
# hostname, or reconnected (Celery drops the tasks it had received but not started),
# is a new incarnation, so what the old one held is known to be lost.
_incarnation = uuid.uuid4().hex[:12]

# Remote control commands the shared workers answer (agentbus.worker).
FOLLOW_COMMAND = "agentbus_follow"
UNFOLLOW_COMMAND = "agentbus_unfollow"
STATUS_COMMAND = "agentbus_status"

# Mark a queue active unless its project is tombstoned (`publish` does the same inside
# its own script, agentbus.transport.PUBLISH). KEYS: active set, tombstone key.
# ARGV: now, queue. Returns -1 (tombstoned), 1 (newly active) or 0 (was active; last use
# refreshed).
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

_scripts: dict[tuple[int, str], Any] = {}


def _script(client: redis.Redis, source: str):
    # A Script is bound to the client it was registered on (tests replace clients).
    key = (id(client), source)
    script = _scripts.get(key)
    if script is None:
        script = _scripts[key] = client.register_script(source)
    return script


def broadcast(command: str, queues: list[str], *, swallow: bool) -> None:
    """Tell the shared workers to follow or leave queues (fire-and-forget)."""
    try:
        current_app.control.broadcast(command, arguments={"queues": queues}, reply=False)
    except Exception:
        if not swallow:
            raise
        # The workers' periodic reconcile converges on the active set anyway.
        logger.warning("could not broadcast %s %s", command, queues, exc_info=True)


def mark_active(project_id: uuid.UUID | str) -> int:
    """Record that the project's queue is in use now; announce it if it was not.

    Returns 1 if the queue became active, 0 if it already was, -1 if the project is
    gone (then nothing is marked).
    """
    queue = project_queue(project_id)
    client = broker_redis()
    result = int(
        _script(client, _MARK_ACTIVE)(
            keys=[ACTIVE_KEY, tombstone_key(project_id)], args=[time.time(), queue]
        )
    )
    if result == 1:
        if uses_amqp():
            client.sadd(AMQP_QUEUES_KEY, queue)  # found by the sweeps (agentbus.broker)
        broadcast(FOLLOW_COMMAND, [queue], swallow=True)
    return result


def active_queues() -> list[str]:
    """The project queues the shared pool follows (oldest use first)."""
    return broker_redis().zrange(ACTIVE_KEY, 0, -1)


def active_among(queues: Iterable[str]) -> set[str]:
    """Which of `queues` are active (one round trip)."""
    queues = list(queues)
    if not queues:
        return set()
    scores = broker_redis().zmscore(ACTIVE_KEY, queues)
    return {q for q, s in zip(queues, scores, strict=True) if s is not None}


def queue_depth(project_id: uuid.UUID | str | None = None, *, queue: str = "") -> int:
    """Messages waiting in the project's queue, or in the `queue` named (not counting
    ones being run)."""
    return _depth(broker_redis(), queue or project_queue(project_id))


def queue_depths(project_ids: list[uuid.UUID]) -> list[int | Exception]:
    """`queue_depth` of many projects in one round trip; an unreadable one is the error."""
    if uses_amqp():
        try:
            found = amqp_depths([project_queue(p) for p in project_ids])
        except Exception as exc:
            return [exc for _ in project_ids]
        return [found[project_queue(p)] for p in project_ids]
    pipe = broker_redis().pipeline(transaction=False)
    keys = [lane_keys(project_queue(p)) for p in project_ids]
    for keys_of_queue in keys:
        for key in keys_of_queue:
            pipe.llen(key)
    replies = iter(pipe.execute(raise_on_error=False))
    depths: list[int | Exception] = []
    for keys_of_queue in keys:
        lengths = [next(replies) for _ in keys_of_queue]
        failed = [r for r in lengths if isinstance(r, Exception)]
        depths.append(failed[0] if failed else sum(lengths))
    return depths


def _depth(client: redis.Redis, queue: str) -> int:
    if uses_amqp():
        return amqp_depth(queue)
    pipe = client.pipeline(transaction=False)
    for key in lane_keys(queue):
        pipe.llen(key)
    return sum(pipe.execute())


def _purge(client: redis.Redis, queue: str) -> int:
    if uses_amqp():
        # The queue itself goes (a RabbitMQ queue costs broker memory even when empty);
        # the broker cancels any consumer still on it (agentbus.worker handles that).
        return amqp_delete(queue)
    pipe = client.pipeline(transaction=True)
    for key in lane_keys(queue):
        pipe.llen(key)
        pipe.delete(key)
    return sum(pipe.execute()[::2])


def retire_project(project_id: uuid.UUID | str) -> int:
    """Take a deleted project off the bus: it leaves the active set, the workers stop
    consuming its queue, the queue is purged. Returns how many messages were purged.
    Idempotent; raises if Redis or the broker is down."""
    queue = project_queue(project_id)
    client = broker_redis()
    pipe = client.pipeline(transaction=True)
    pipe.zrem(ACTIVE_KEY, queue)
    pipe.zadd(RETIRED_KEY, {queue: time.time()})
    unlist(pipe, queue)
    forget_flow(pipe, queue)
    pipe.execute()
    broadcast(UNFOLLOW_COMMAND, [queue], swallow=False)
    purged = _purge(client, queue)
    logger.info("retired %s (%d queued messages purged)", queue, purged)
    return purged


def reap_idle_queues(*, idle_seconds: float | None = None, batch: int = 500) -> list[str]:
    """Retire active queues that are empty, have no message being run, and were not
    published to for `idle_seconds`; tell the workers. Returns their names."""
    if idle_seconds is None:
        idle_seconds = settings.AGENTBUS_QUEUE_IDLE_SECONDS
    client = broker_redis()
    cutoff = time.time() - idle_seconds
    in_flight = unacked_queues(client)
    steps = keys_per_project_queue()
    retired: list[str] = []
    offset = 0
    budget = Budget(settings.AGENTBUS_REAP_BUDGET_SECONDS)
    batches = 0
    while not batches or not budget.over():  # past its budget: the next run goes on
        batches += 1
        candidates = client.zrangebyscore(ACTIVE_KEY, "-inf", cutoff, start=offset, num=batch)
        if not candidates:
            break
        offset += len(candidates)
        idle = [q for q in candidates if q not in in_flight]
        if idle and uses_amqp():
            # The retire script's LLEN sees no RabbitMQ queue: only empty ones go to it. A
            # publish after this check refreshed the queue's score first, so it stays.
            depths = amqp_depths(idle)
            idle = [q for q in idle if not depths[q]]
        if not idle:
            continue
        keys = [ACTIVE_KEY, RETIRED_KEY, *all_lane_keys(idle)]
        args = [cutoff, steps, time.time(), *idle]
        done = _script(client, _RETIRE_IDLE)(keys=keys, args=args)
        retired.extend(done)
        offset -= len(done)  # retired members left the set: the window shifts back
    if retired:
        logger.info("retired %d idle queues", len(retired))
        broadcast(UNFOLLOW_COMMAND, retired, swallow=True)
    return retired


def rescue_stranded_queues(*, full_scan: bool | None = None) -> list[str]:
    """Re-activate project queues that hold messages but left the active set.

    A message can come back to a retired queue: kombu puts a message back when the
    worker holding it dies, at once or after the visibility timeout. So queues retired
    within twice the visibility timeout are checked (one LLEN each). The whole keyspace
    is scanned for stranded queues too, at most once every AGENTBUS_FULL_RESCUE_SECONDS
    (or when `full_scan`), in case the active set itself was lost. Queues of deleted
    projects are purged instead. Returns the names of the re-activated queues.
    """
    client = broker_redis()
    options = settings.CELERY_BROKER_TRANSPORT_OPTIONS or {}
    window = 2 * float(options.get("visibility_timeout", 3600))
    client.zremrangebyscore(RETIRED_KEY, "-inf", time.time() - window)
    candidates = set(client.zrange(RETIRED_KEY, 0, -1))
    if full_scan is None:
        every = int(settings.AGENTBUS_FULL_RESCUE_SECONDS)
        full_scan = bool(client.set(FULL_SCAN_KEY, "1", nx=True, ex=every))
    if full_scan and uses_amqp():
        candidates |= amqp_known_queues()
    elif full_scan:
        pattern = queue_key_pattern(PROJECT_QUEUE_PREFIX)
        for key in client.scan_iter(match=pattern, count=1000, _type="list"):
            queue = lane_base(queue_of_key(key))
            if project_id_from_queue(queue) is not None:
                candidates.add(queue)
    candidates -= active_among(candidates)
    if uses_amqp():
        depths = amqp_depths(sorted(candidates))  # one channel for all
        stranded = [q for q in sorted(candidates) if depths[q]]
    else:
        stranded = [q for q in sorted(candidates) if _depth(client, q)]
    rescued = []
    for queue in stranded:
        project_id = project_id_from_queue(queue)
        if project_gone(project_id):
            _purge(client, queue)
        elif mark_active(project_id) >= 0:
            client.zrem(RETIRED_KEY, queue)
            list_if_waiting(client, [queue])
            rescued.append(queue)
    if rescued:
        logger.warning("re-activated %d queues holding messages: %s", len(rescued), rescued[:10])
    return rescued


def sweep_ready(*, force: bool = False, batch: int = 1000) -> int | None:
    """List again the active queues that hold messages but are not on the ready list
    (sent around `publish`, or put back by a channel other than ours), at most once
    every AGENTBUS_READY_SWEEP_SECONDS across all workers (or when `force`). One LLEN
    per active queue, in scripts of `batch` queues. Returns how many were listed, or
    None when another worker swept within the period."""
    if uses_amqp():
        return 0  # no ready list: the broker delivers from every followed queue
    client = broker_redis()
    if not force:
        every = max(float(settings.AGENTBUS_READY_SWEEP_SECONDS), 0.001)
        if not client.set(READY_SWEEP_KEY, "1", nx=True, px=int(every * 1000)):
            return None
    listed = 0
    offset = 0
    while True:
        queues = client.zrange(ACTIVE_KEY, offset, offset + batch - 1)
        if not queues:
            break
        offset += len(queues)
        # A queue parked at its cap (agentbus.flow) is off the list on purpose: the take
        # lists it again when a slot comes back. With flow control off no take does
        # (one parked before it was turned off is listed here).
        if flow_control_on():
            parked = client.zmscore(FLOW_PARKED_KEY, queues)
            queues = [q for q, p in zip(queues, parked, strict=True) if p is None]
        listed += list_if_waiting(client, queues)
    if listed:
        logger.warning("listed %d queue(s) holding messages the ready list missed", listed)
    return listed


def worker_identity(hostname: str) -> str:
    """This worker's id as `live_workers` reports it: `<hostname>#<incarnation>`."""
    return f"{hostname}#{_incarnation}"


def on_task_received(
    names: Iterable[str], mark: Callable[[dict[str, Any], str], None], *, what: str
) -> None:
    """Call `mark(task kwargs, worker_identity)` when this worker receives (prefetches) a
    task named in `names`, so a recovery pass can tell whose it was if the worker dies
    before acknowledging it, instead of waiting out the broker's visibility timeout. A
    failing mark is logged (`what`: what it marks), never fails the delivery."""
    names = frozenset(names)

    def received(sender=None, request=None, **kwargs) -> None:
        if request is None or request.name not in names:
            return
        try:
            mark(request.kwargs, worker_identity(request.hostname))
        except Exception:
            logger.warning("could not mark %s received", what, exc_info=True)

    task_received.connect(received, weak=False, dispatch_uid=f"agentbus.received:{what}")


def worker_connected(hostname: str, *, mode: str) -> None:
    """The worker's consumer (re)started: a new incarnation, and the old one is gone at
    once (not three heartbeats later)."""
    global _incarnation
    old = f"{hostname} {mode} {_incarnation}"
    _incarnation = uuid.uuid4().hex[:12]
    client = broker_redis()
    client.zrem(WORKERS_KEY, old)
    worker_alive(hostname, mode=mode)


def worker_alive(hostname: str, *, mode: str) -> None:
    """A worker's heartbeat (every AGENTBUS_HEARTBEAT_SECONDS), at Redis's time: a host
    whose clock is off is judged by the same clock as the others."""
    run_script(broker_redis(), HEARTBEAT, [WORKERS_KEY], [f"{hostname} {mode} {_incarnation}"])


def worker_gone(hostname: str) -> None:
    client = broker_redis()
    members = [m for m in client.zrange(WORKERS_KEY, 0, -1) if m.split(" ")[0] == hostname]
    if members:
        client.zrem(WORKERS_KEY, *members)


def live_workers() -> list[dict[str, Any]]:
    """Workers that beat within three heartbeat periods: [{"name", "mode", "seen", "id"}]
    (`id`: see worker_identity). Three round trips (Redis's time first), no waiting
    for replies (unlike a broadcast ping)."""
    client = broker_redis()
    now = redis_time(client)  # the heartbeats' clock
    horizon = now - 3 * settings.AGENTBUS_HEARTBEAT_SECONDS
    client.zremrangebyscore(WORKERS_KEY, "-inf", now - 86400)  # long gone: forget
    beats = client.zrangebyscore(WORKERS_KEY, horizon, "+inf", withscores=True)
    workers = []
    for member, seen in beats:
        name, _, rest = member.partition(" ")
        mode, _, incarnation = rest.partition(" ")
        workers.append(
            {
                "name": name,
                "mode": mode,
                "seen": round(now - seen, 3),
                "id": f"{name}#{incarnation}",
            }
        )
    return workers


def project_queues_in_keyspace() -> set[uuid.UUID]:
    """Every project that has a queue list in the broker (a keyspace scan)."""
    found = set()
    if uses_amqp():
        return {p for p in map(project_id_from_queue, amqp_known_queues()) if p is not None}
    pattern = queue_key_pattern(PROJECT_QUEUE_PREFIX)
    for key in broker_redis().scan_iter(match=pattern, count=1000):
        project_id = project_id_from_queue(lane_base(queue_of_key(key)))
        if project_id is not None:
            found.add(project_id)
    return found
