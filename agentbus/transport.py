"""Everything that knows kombu's or Redis's private layout, in one module.

The AgentBus leans on things kombu does not promise:

1. How the Redis transport names a queue's lists (priority steps, separator, global
   key prefix): `queue_keys`.
2. How it records delivered, unacknowledged messages (`unacked`, a hash of delivery tag
   -> JSON [payload, exchange, routing key], and `unacked_index`, tag -> time):
   `unacked_queues`, and the take script below, which writes the same record.
3. How its channel polls (`Channel._brpop_start` / `_brpop_read`, the fair cycle), puts
   a message (`Channel._put`) and puts one back (`Channel._do_restore_message`).

**The ready list.** kombu's channel sends one BRPOP over every queue it follows, so its
cost per message grows with the number of followed queues, idle ones included. Here a
shared worker never names a project queue in a poll. Instead:

- a publish is one Lua script (`Channel._put` on the publishers' side): the lifecycle
  guard's check, the active set's timestamp, the LPUSH of the message, and, when the
  queue is not listed yet, its name appended to the ready list (READY_KEY; the set
  READY_MEMBERS_KEY keeps one entry per queue) and the bell rung for a sleeping worker;
- a shared worker's poll is one Lua script too (`TAKE`): the first message of its own
  non-project queues (the maintenance queue), else the queue at the head of the ready
  list gives its oldest message and goes back to the tail if it holds more (round
  robin between projects, one message per turn); the message is recorded in kombu's
  `unacked` hash in the same step, so a worker that dies right after the pop loses
  nothing; a deleted project's queue (tombstoned) is purged and skipped instead;
- with nothing to take, the worker blocks on one BRPOP over its own queues, the bell
  and its wake key, whatever the number of active projects.

Every delivery is O(1) in the number of active projects. A message kombu puts back
(visibility timeout, a lost worker, a reject) is listed again in the same transaction
(`_do_restore_message`). What reaches a project queue around these scripts (a plain
`apply_async`, a restore by kombu's own channel) is listed again by the periodic sweep
`list_stranded` (agentbus.active.sweep_ready).

A dedicated worker (and any channel not switched to the ready list) polls the kombu
way, over its followed queues, with the BRPOP cached plus a *wake key* of its own:
pushing to it (`wake`) ends a BRPOP in flight, so a queue just followed is polled at
once (no `CLIENT` command, which many managed Redis services refuse).

Each of these is checked against the installed kombu by `tests/agentbus/test_transport.py`
(calling kombu's own methods). At run time the channel takes over only where it was
tested: kombu `KOMBU_TESTED`, one priority step, no global key prefix. Anywhere else it
is kombu's own channel (and publishers mark the queue active in a separate step), and
the worker says so once at start (`check_kombu`).
"""

from __future__ import annotations

import base64
import collections
import contextlib
import hashlib
import json
import logging
import time
import uuid
from collections.abc import Iterable, Iterator
from queue import Empty
from time import monotonic

import kombu
from django.conf import settings
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str
from redis.exceptions import NoScriptError

from .guard import TOMBSTONE_PREFIX, project_gone, tombstone_key
from .keys import (
    ACTIVE_KEY,
    BULK_SUFFIX,
    FLOW_CREDIT_KEY,
    FLOW_PARKED_DUE_FIELD,
    FLOW_PARKED_KEY,
    FLOW_RULES_KEY,
    FLOW_SLOTS_PREFIX,
    FLOW_STATS_KEY,
    READY_BELL_KEY,
    READY_KEY,
    READY_MEMBERS_KEY,
    WAKE_PREFIX,
)
from .queues import PROJECT_QUEUE_PREFIX, is_project_queue, project_id_from_queue

logger = logging.getLogger(__name__)

# kombu releases whose private layout this module was checked against.
KOMBU_TESTED = ("5.7.",)
WAKE_TTL_SECONDS = 60
# Headers a worker's channel adds to a delivered project task (read by AgentBusTask).
GONE_HEADER = "agentbus_gone"
CHECKED_HEADER = "agentbus_checked_at"
# Entries of deleted or emptied queues one take may skip before it gives up.
TAKE_SKIP_MAX = 64
# Lanes of a project's queue (publish's `lane`), carried in a message header.
INTERACTIVE, BULK = "interactive", "bulk"
LANES = (INTERACTIVE, BULK)
LANE_HEADER = "agentbus_lane"
# What TAKE counts per project queue in FLOW_STATS_KEY ("<name>:<queue>"): takes, takes
# from the bulk lane, takes refused at the cap (the queue parked).
FLOW_COUNTERS = ("served", "bulk", "capped")


def kombu_tested() -> bool:
    return kombu.__version__.startswith(KOMBU_TESTED)


def check_kombu() -> bool:
    """Warn (once, at worker start) when the installed kombu is not one this module was
    tested with: the channel then behaves exactly as kombu's own."""
    if kombu_tested():
        return True
    logger.warning(
        "AgentBus: kombu %s is not one of %s: polling with kombu's own channel "
        "(one BRPOP over every followed queue, no ready list)",
        kombu.__version__,
        ", ".join(f"{v}x" for v in KOMBU_TESTED),
    )
    return False


# --- 1. queue keys -----------------------------------------------------------------


def _transport_options() -> dict:
    return settings.CELERY_BROKER_TRANSPORT_OPTIONS or {}


def queue_keys(queue: str) -> list[str]:
    """The Redis lists holding one queue's messages (one per priority step), as
    kombu's `Channel._q_for_pri` names them."""
    options = _transport_options()
    steps = sorted(options.get("priority_steps") or kombu_redis.Channel.priority_steps)
    sep = options.get("sep", kombu_redis.Channel.sep)
    prefix = options.get("global_keyprefix", "") or ""
    base = prefix + queue
    return [f"{base}{sep}{p}" if p else base for p in steps]


def all_queue_keys(queues: Iterable[str]) -> list[str]:
    return [key for queue in queues for key in queue_keys(queue)]


def lane_keys(queue: str) -> list[str]:
    """Every list holding a project queue's messages: kombu's (`queue_keys`), then its
    bulk lane's."""
    return [*queue_keys(queue), queue + BULK_SUFFIX]


def all_lane_keys(queues: Iterable[str]) -> list[str]:
    return [key for queue in queues for key in lane_keys(queue)]


def keys_per_project_queue() -> int:
    return len(queue_keys("x")) + 1


def queue_of_key(key: str) -> str:
    """The queue a list key belongs to (inverse of `queue_keys`)."""
    options = _transport_options()
    prefix = options.get("global_keyprefix", "") or ""
    sep = options.get("sep", kombu_redis.Channel.sep)
    return key[len(prefix) :].split(sep, 1)[0] if key.startswith(prefix) else key


def queue_key_pattern(queue_prefix: str) -> str:
    """A SCAN pattern matching the list keys of every queue starting with `queue_prefix`."""
    prefix = _transport_options().get("global_keyprefix", "") or ""
    return f"{prefix}{queue_prefix}*"


# --- 2. unacknowledged messages ---------------------------------------------------


def unacked_key() -> str:
    options = _transport_options()
    prefix = options.get("global_keyprefix", "") or ""
    return prefix + options.get("unacked_key", kombu_redis.Channel.unacked_key)


def unacked_index_key() -> str:
    options = _transport_options()
    prefix = options.get("global_keyprefix", "") or ""
    return prefix + options.get("unacked_index_key", kombu_redis.Channel.unacked_index_key)


def unacked_queues(client) -> set[str]:
    """Project queues with a message delivered to a worker and not acknowledged yet
    (kombu puts those back when the worker dies)."""
    queues: set[str] = set()
    for _tag, raw in client.hscan_iter(unacked_key(), count=500):
        try:
            _payload, exchange, routing_key = json.loads(raw)
        except (TypeError, ValueError):
            continue
        if not exchange and routing_key and is_project_queue(lane_base(routing_key)):
            queues.add(lane_base(routing_key))
    return queues


# --- the scripts -------------------------------------------------------------------------

# A publish to a project queue. KEYS: the queue's list (of its lane), active set,
# tombstone, ready members, ready list, bell, and for the bulk lane the flow rules.
# ARGV: message, now, queue. Returns -1 (project deleted: nothing written), 1 (the queue
# became active) or 0. A bulk message also marks its queue as having a bulk lane (the
# field "<queue>:bulk" of the flow rules, read by TAKE with the rules in one HMGET): a
# queue never given bulk work takes no lane turns.
PUBLISH = """
if redis.call('EXISTS', KEYS[3]) == 1 then return -1 end
local fresh = redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
redis.call('LPUSH', KEYS[1], ARGV[1])
if KEYS[7] then redis.call('HSET', KEYS[7], KEYS[1], '1') end
if redis.call('SADD', KEYS[4], ARGV[3]) == 1 then
  redis.call('RPUSH', KEYS[5], ARGV[3])
  if redis.call('LLEN', KEYS[6]) == 0 then redis.call('RPUSH', KEYS[6], '1') end
end
return fresh
"""

# List the queues that hold messages and are not listed (a restore, the sweep).
# KEYS: ready members, ready list, bell, then `steps` list keys per queue.
# ARGV: steps, queue names. Returns how many were listed.
LIST_IF_WAITING = """
local steps = tonumber(ARGV[1])
local added = 0
for i = 2, #ARGV do
  local first = 4 + (i - 2) * steps
  local waiting = 0
  for k = first, first + steps - 1 do waiting = waiting + redis.call('LLEN', KEYS[k]) end
  if waiting > 0 and redis.call('SADD', KEYS[1], ARGV[i]) == 1 then
    redis.call('RPUSH', KEYS[2], ARGV[i])
    added = added + 1
  end
end
if added > 0 and redis.call('LLEN', KEYS[3]) == 0 then redis.call('RPUSH', KEYS[3], '1') end
return added
"""

# Redis's clock, in seconds, as `now`: every script that times something (a take's slot
# leases, their renewal, a heartbeat) reads this one clock, whatever the hosts' say.
_NOW = """
local now_t = redis.call('TIME')
local now = tonumber(now_t[1]) + tonumber(now_t[2]) / 1000000
"""

# What both takes (TAKE, TAKE_PLAIN) begin with: the time; `record`, which records a
# delivery as kombu's QoS.append does (to be put back on the list it was taken from: its
# lane) in the same step; `take_own`, the first message of the worker's own
# (non-project) queues, KEYS from `first` on; and `ring`, after a take from the ready
# list: the entries left on it, and the bell for a sleeping worker when there are any.
_TAKE_COMMON = (
    _NOW
    + """
local function record(lane, payload)
  -- The delivery tag: the last "delivery_tag" key of the message, in its properties
  -- (kombu writes them last; the body is base64, and a quote inside a string value
  -- is escaped, so the pattern cannot match inside one). Found without decoding.
  local at, tag = 0, nil
  while true do
    local s, e = string.find(payload, '"delivery_tag": "', at + 1, true)
    if not s then break end
    at = e
  end
  if at > 0 then tag = string.sub(payload, at + 1, string.find(payload, '"', at + 1, true) - 1) end
  if not tag then return 0, nil end
  redis.call('ZADD', KEYS[5], now, tag)
  -- Put back to the list it was taken from (kombu's restore: nameless exchange).
  redis.call('HSET', KEYS[4], tag, '[' .. payload .. ',"",' .. cjson.encode(lane) .. ']')
  return 1, tag
end
local function take_own(first)
  for k = first, #KEYS do
    local payload = redis.call('RPOP', KEYS[k])
    if payload then return {KEYS[k], payload, 1, (record(KEYS[k], payload)), 0} end
  end
  return nil
end
local function ring()
  local left = redis.call('LLEN', KEYS[1])
  if left == 0 then
    -- This worker saw the list empty: a token rung for what it just took would only
    -- wake it (or another) for nothing.
    redis.call('DEL', KEYS[3])
  elseif redis.call('LLEN', KEYS[3]) == 0 then
    redis.call('RPUSH', KEYS[3], '1')  -- more work: wake another worker that sleeps
  end
  return left
end
"""
)

# The take with flow control off (AGENTBUS_FLOW_CONTROL false): the bus without the
# rules, plain round robin, one message per turn; no rules read, no slot, no counter,
# no lane turn. KEYS: ready list, ready members, bell, unacked, unacked index, then the
# worker's own queues. ARGV: tombstone prefix, project queue prefix, entries to skip,
# bulk suffix. Returns {queue, message, ready entries left, recorded, 0, lane} or false.
# Publishers put bulk work on the interactive list then; a bulk list is looked at only
# when the interactive one is empty (work left there while flow control was on).
TAKE_PLAIN = (
    _TAKE_COMMON
    + """
local own = take_own(6)
if own then return own end
local skip = string.len(ARGV[2])
for _ = 1, tonumber(ARGV[3]) do
  local queue = redis.call('LPOP', KEYS[1])
  if not queue then
    redis.call('DEL', KEYS[3])  -- nothing listed: no wake-up is owed
    return false
  end
  local payload, lane = false, queue
  if redis.call('EXISTS', ARGV[1] .. string.sub(queue, skip + 1)) == 1 then
    redis.call('DEL', queue, queue .. ARGV[4])
  else
    payload = redis.call('RPOP', queue)
    if not payload then
      lane = queue .. ARGV[4]
      payload = redis.call('RPOP', lane)
    end
  end
  if payload and redis.call('LLEN', lane) > 0 then
    redis.call('RPUSH', KEYS[1], queue)
  else
    redis.call('SREM', KEYS[2], queue)
  end
  if payload then
    local recorded = record(lane, payload)
    return {queue, payload, ring(), recorded, 0, lane}
  end
end
return false
"""
)

# A shared worker's poll (one priority step, no key prefix: see Channel.takes_over).
# KEYS: ready list, ready members, bell, unacked, unacked index, flow rules, flow
# credit, parked queues, flow counters, then the worker's own (non-project) queues.
# ARGV: tombstone prefix, project queue prefix, entries to skip, slot lease seconds,
# bulk turn (one take in this many prefers the bulk lane), slots prefix, bulk suffix,
# the weight of a queue without rules, the rules' field of the parked queues' due time.
# Returns {queue, message, ready entries left, recorded, slot, lane, counted} or false.
# The message is recorded as kombu's QoS.append records a delivery (to be put back on
# the list it was taken from: its lane), in the same step; `recorded` 0: it had no
# delivery tag to record under. `slot` 1: the message holds one of its project's capped
# slots. `counted` 0: the take was not added to the queue's served counter (the worker
# adds it, `Channel.flush_served`): only a queue given bulk work is counted here.
#
# Flow control (agentbus.flow), all in this one step:
# - weights: the queue at the head serves up to <weight> messages in a row before it
#   goes to the tail (weighted round robin); an idle queue leaves the list, so its
#   share goes to the queues that have work;
# - caps: a queue with <cap> slots held (leases not ended) is parked off the list until
#   a slot is released (agentbus.flow.RELEASE) or its earliest lease ends;
# - lanes: the interactive list first; the bulk list when the interactive one is empty,
#   and on one take in <bulk turn> whatever the interactive list holds.
# What a project without rules pays for them: one HMGET (its rules, its bulk mark, the
# parked queues' due time); no counter (the worker counts takes and adds them up in
# batches, unless the queue has bulk work), no credit (weight 1 serves one message a
# turn), no slot (no cap: nothing to lease, renew or release), no lane turn and no look
# at a bulk list unless it was given bulk work.
TAKE = (
    _TAKE_COMMON
    + """
local function list(queue)
  if redis.call('SADD', KEYS[2], queue) == 1 then redis.call('RPUSH', KEYS[1], queue) end
end
local own = take_own(10)
if own then return own end
-- Parked queues whose earliest lease ended: listed again (their slot may be free
-- now). Looked at only when the earliest due time (a field of the rules, read with a
-- queue's rules) has passed, or the ready list is empty.
local due_field = ARGV[9]
local function relist_due()
  local due = redis.call('ZRANGEBYSCORE', KEYS[8], '-inf', now, 'LIMIT', 0, 16)
  for _, queue in ipairs(due) do
    redis.call('ZREM', KEYS[8], queue)
    list(queue)
  end
  local next_due = redis.call('ZRANGE', KEYS[8], 0, 0, 'WITHSCORES')
  if next_due[2] then
    redis.call('HSET', KEYS[6], due_field, next_due[2])
  else
    redis.call('HDEL', KEYS[6], due_field)
  end
  return #due
end
local skip = string.len(ARGV[2])
local lease = tonumber(ARGV[4])
local bulk_every = tonumber(ARGV[5])
for _ = 1, tonumber(ARGV[3]) do
  local queue = redis.call('LPOP', KEYS[1])
  if not queue and redis.call('EXISTS', KEYS[8]) == 1 and relist_due() > 0 then
    queue = redis.call('LPOP', KEYS[1])
  end
  if not queue then
    redis.call('DEL', KEYS[3])  -- nothing listed: no wake-up is owed
    return false
  end
  local bulk = queue .. ARGV[7]
  local payload, lane = false, queue
  local weight, cap = tonumber(ARGV[8]), 0
  local slots = ARGV[6] .. queue
  local rules = redis.call('HMGET', KEYS[6], queue, bulk, due_field)
  local has_bulk = rules[2]
  local due_at = tonumber(rules[3])
  if due_at and due_at <= now then
    relist_due()
    due_at = tonumber(redis.call('HGET', KEYS[6], due_field))
  end
  if rules[1] then
    local w, c = string.match(rules[1], '^(%d+) (%d+)$')
    if w then weight, cap = tonumber(w), tonumber(c) end
  end
  local parked, held, counted = false, 0, 0
  if redis.call('EXISTS', ARGV[1] .. string.sub(queue, skip + 1)) == 1 then
    redis.call('DEL', queue, bulk)
  else
    if cap > 0 then
      -- Expired leases are dropped only when they would refuse the take: a project
      -- under its cap pays one ZCARD here.
      held = redis.call('ZCARD', slots)
      if held >= cap then
        redis.call('ZREMRANGEBYSCORE', slots, '-inf', now)
        held = redis.call('ZCARD', slots)
      end
      if held >= cap then
        -- At its cap: off the list (not in a worker) until a slot comes back.
        local first = redis.call('ZRANGE', slots, 0, 0, 'WITHSCORES')
        local lease_end = tonumber(first[2]) or now
        redis.call('ZADD', KEYS[8], lease_end, queue)
        if not due_at or lease_end < due_at then
          redis.call('HSET', KEYS[6], due_field, lease_end)
        end
        redis.call('HINCRBY', KEYS[9], 'capped:' .. queue, 1)
        parked = true
      end
    end
    if not parked then
      -- Takes are counted here for a queue given bulk work (its lane turn needs the
      -- count); for any other the worker counts them and adds them up in batches.
      local first, second = queue, bulk
      if has_bulk then
        counted = 1
        local served = redis.call('HINCRBY', KEYS[9], 'served:' .. queue, 1)
        if has_bulk and served % bulk_every == 0 then first, second = bulk, queue end
      end
      payload, lane = redis.call('RPOP', first), first
      if not payload then payload, lane = redis.call('RPOP', second), second end
      if not payload and counted == 1 then
        redis.call('HINCRBY', KEYS[9], 'served:' .. queue, -1)
      end
      if payload and lane == bulk then
        redis.call('HINCRBY', KEYS[9], 'bulk:' .. queue, 1)
        if redis.call('LLEN', bulk) == 0 then
          if has_bulk then redis.call('HDEL', KEYS[6], bulk) end  -- no lane turns owed
          has_bulk = false
        elseif not has_bulk then
          redis.call('HSET', KEYS[6], bulk, '1')  -- bulk work came around the mark
          has_bulk = '1'
        end
      end
    end
  end
  local more = payload and (redis.call('LLEN', queue) > 0
    or (has_bulk and redis.call('LLEN', bulk) > 0))
  if more and weight > 1 then
    local credit = redis.call('HINCRBY', KEYS[7], queue, -1)
    if credit < 0 then credit = redis.call('HINCRBY', KEYS[7], queue, weight) end
    if credit > 0 and (cap == 0 or held + 1 < cap) then
      redis.call('LPUSH', KEYS[1], queue)  -- its turn goes on
    else
      redis.call('HDEL', KEYS[7], queue)
      redis.call('RPUSH', KEYS[1], queue)
    end
  elseif more then
    redis.call('RPUSH', KEYS[1], queue)  -- weight 1: one message a turn, no credit kept
  else
    if weight > 1 then redis.call('HDEL', KEYS[7], queue) end
    if has_bulk and redis.call('LLEN', bulk) == 0 then redis.call('HDEL', KEYS[6], bulk) end
    redis.call('SREM', KEYS[2], queue)
  end
  if payload then
    local recorded, tag = record(lane, payload)
    local slot = 0
    if cap > 0 and tag then
      redis.call('ZADD', slots, now + lease, tag)
      slot = 1
    end
    return {queue, payload, ring(), recorded, slot, lane, counted}
  end
end
return false
"""
)

# A capped slot given back (the message was acknowledged, rejected or put back).
# KEYS: the queue's slots, parked queues, ready members, ready list, bell.
# ARGV: delivery tag, queue. A queue parked at its cap is listed again at once.
RELEASE = """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then return 0 end
if redis.call('ZREM', KEYS[2], ARGV[2]) == 1 and redis.call('SADD', KEYS[3], ARGV[2]) == 1 then
  redis.call('RPUSH', KEYS[4], ARGV[2])
  if redis.call('LLEN', KEYS[5]) == 0 then redis.call('RPUSH', KEYS[5], '1') end
end
return 1
"""

# Slots still held by this worker: their leases pushed back, from Redis's time as a
# take's (ZADD XX: a slot that expired meanwhile, and was perhaps given to another, is
# not taken again). KEYS: slots of each queue (one per tag). ARGV: lease seconds, then
# the tags.
RENEW = (
    _NOW
    + """
local lease_end = now + tonumber(ARGV[1])
local n = 0
for i = 1, #KEYS do n = n + redis.call('ZADD', KEYS[i], 'XX', 'CH', lease_end, ARGV[i + 1]) end
return n
"""
)

# A worker's heartbeat, at Redis's time (as the takes' leases): hosts read it against
# that one clock, whatever their own say.
# KEYS: the workers' set. ARGV: the worker's member.
HEARTBEAT = (
    _NOW
    + """
return redis.call('ZADD', KEYS[1], now, ARGV[1])
"""
)


def redis_time(client) -> float:
    """Redis's clock, in seconds: the one every host's bus bookkeeping is timed by."""
    seconds, micros = client.time()
    return seconds + micros / 1_000_000


_SHA = {
    source: hashlib.sha1(source.encode()).hexdigest()
    for source in (PUBLISH, TAKE, TAKE_PLAIN, RELEASE, RENEW, HEARTBEAT)
}


def flow_control_on() -> bool:
    """Whether the shared workers' take applies the flow rules (AGENTBUS_FLOW_CONTROL):
    off, it is the plain round robin (TAKE_PLAIN) and bulk work goes on the interactive
    list; the rules stay stored, not applied."""
    return bool(settings.AGENTBUS_FLOW_CONTROL)


def take_call(unacked: str, unacked_index: str) -> tuple[str, list[str], list[str]]:
    """The take a shared worker sends (TAKE, or TAKE_PLAIN with flow control off), its
    keys before the worker's own queues and its arguments, given kombu's unacked keys."""
    keys = [READY_KEY, READY_MEMBERS_KEY, READY_BELL_KEY, unacked, unacked_index]
    if not flow_control_on():
        return (
            TAKE_PLAIN,
            keys,
            [TOMBSTONE_PREFIX, PROJECT_QUEUE_PREFIX, str(TAKE_SKIP_MAX), BULK_SUFFIX],
        )
    keys += [FLOW_RULES_KEY, FLOW_CREDIT_KEY, FLOW_PARKED_KEY, FLOW_STATS_KEY]
    args = [
        TOMBSTONE_PREFIX,
        PROJECT_QUEUE_PREFIX,
        str(TAKE_SKIP_MAX),
        str(settings.AGENTBUS_SLOT_LEASE_SECONDS),
        str(max(1, int(settings.AGENTBUS_BULK_EVERY))),
        FLOW_SLOTS_PREFIX,
        BULK_SUFFIX,
        str(max(1, int(settings.AGENTBUS_DEFAULT_WEIGHT))),
        FLOW_PARKED_DUE_FIELD,
    ]
    return TAKE, keys, args


def lane_list(queue: str, lane: str) -> str:
    """The list a project queue's message of `lane` waits in."""
    return queue + BULK_SUFFIX if lane == BULK else queue


def lane_base(key: str) -> str:
    """The project queue a lane's list belongs to."""
    return key[: -len(BULK_SUFFIX)] if key.endswith(BULK_SUFFIX) else key


def slots_key(queue: str) -> str:
    return FLOW_SLOTS_PREFIX + queue


def release_keys(queue: str) -> list[str]:
    return [slots_key(queue), FLOW_PARKED_KEY, READY_MEMBERS_KEY, READY_KEY, READY_BELL_KEY]


def run_script(client, source: str, keys: list, args: list):
    """EVALSHA, loading the script when the server does not know it (first use, or a
    restarted Redis)."""
    sha = _SHA.get(source) or _SHA.setdefault(source, hashlib.sha1(source.encode()).hexdigest())
    try:
        return client.evalsha(sha, len(keys), *keys, *args)
    except NoScriptError:
        return client.eval(source, len(keys), *keys, *args)


def list_if_waiting(client, queues: list[str]) -> int:
    """List `queues` that hold messages and are not on the ready list (one round trip);
    returns how many were listed."""
    if not queues:
        return 0
    steps = keys_per_project_queue()
    keys = [READY_MEMBERS_KEY, READY_KEY, READY_BELL_KEY, *all_lane_keys(queues)]
    return int(run_script(client, LIST_IF_WAITING, keys, [steps, *queues]))


def forget_flow(pipe, queue: str) -> None:
    """Drop a deleted project's flow state (in the caller's pipeline or transaction)."""
    pipe.hdel(FLOW_RULES_KEY, queue, queue + BULK_SUFFIX)
    pipe.hdel(FLOW_CREDIT_KEY, queue)
    pipe.hdel(FLOW_STATS_KEY, *(f"{name}:{queue}" for name in FLOW_COUNTERS))
    pipe.zrem(FLOW_PARKED_KEY, queue)
    pipe.delete(slots_key(queue))


def unlist(pipe, queue: str) -> None:
    """Take a queue off the ready list (in the caller's pipeline or transaction)."""
    pipe.srem(READY_MEMBERS_KEY, queue)
    pipe.lrem(READY_KEY, 0, queue)


def publish_script_keys(queue: str, lane: str = INTERACTIVE) -> list[str]:
    project_id = project_id_from_queue(queue)
    keys = [
        lane_list(queue, lane),
        ACTIVE_KEY,
        tombstone_key(project_id),
        READY_MEMBERS_KEY,
        READY_KEY,
        READY_BELL_KEY,
    ]
    if lane == BULK:
        keys.append(FLOW_RULES_KEY)  # the bulk lane's mark
    return keys


def message_push(client, queue: str, message: dict) -> int:
    """Push kombu's `message` on project queue `queue` (its lane's list) with the PUBLISH
    script: -1 when the project was deleted (nothing pushed), 1 when the queue became
    active (the shared workers are to be told), else 0."""
    headers = message.get("headers") if isinstance(message, dict) else None
    lane = headers.get(LANE_HEADER) if isinstance(headers, dict) else None
    if not flow_control_on():
        lane = INTERACTIVE  # no lanes without the rules: the project's one list
    keys = publish_script_keys(queue, lane or INTERACTIVE)
    return int(run_script(client, PUBLISH, keys, [json.dumps(message), time.time(), queue]))


def message_for_queue(*, body: bytes, content_type: str, content_encoding: str,
                      headers: dict, properties: dict, queue: str) -> dict:  # fmt: skip
    """The message kombu's Redis channel builds for `body` (serialized) published on the
    nameless exchange to `queue` (Producer.publish, Channel.prepare_message and
    basic_publish, with the channel's default priority and base64 bodies)."""
    return {
        "body": bytes_to_str(base64.b64encode(body)),
        "content-encoding": content_encoding,
        "content-type": content_type,
        "headers": headers,
        "properties": {
            **properties,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }


# --- 3. the worker's poll ------------------------------------------------------------


def _bulk(value: bytes) -> bytes:
    """One RESP bulk string."""
    return b"$%d\r\n%s\r\n" % (len(value), value)


def _command(*parts: bytes | str) -> bytes:
    """One RESP command."""
    encoded = [p.encode() if isinstance(p, str) else p for p in parts]
    return b"*%d\r\n" % len(encoded) + b"".join(map(_bulk, encoded))


class QoS(kombu_redis.QoS):
    def _remove_from_indices(self, delivery_tag, pipe=None):
        """kombu's, plus giving back the capped slot the message held (acknowledged,
        rejected or put back: every way out of `unacked` passes here)."""
        pipe = super()._remove_from_indices(delivery_tag, pipe)
        queue = self.channel._slots.pop(delivery_tag, None)
        if queue is not None:
            keys = release_keys(queue)
            pipe.eval(RELEASE, len(keys), *keys, delivery_tag, queue)
        return pipe

    def append(self, message, delivery_tag):
        """kombu's own record of a delivered message (unacked index and hash, one
        pipeline), plus, for a project's task, whether the project was deleted. A
        message taken from the ready list was recorded by the take itself."""
        recorded = self.channel._recorded
        if delivery_tag in recorded:
            recorded.discard(delivery_tag)
            return virtual.QoS.append(self, message, delivery_tag)
        delivery = message.delivery_info
        exchange, routing_key = delivery["exchange"], delivery["routing_key"]
        project_id = project_id_from_queue(routing_key) if not exchange else None
        with self.pipe_or_acquire() as pipe:
            pipe.zadd(self.unacked_index_key, {delivery_tag: time.time()}).hset(
                self.unacked_key, delivery_tag, json.dumps([message._raw, exchange, routing_key])
            )
            if project_id is not None and self.channel.takes_over:
                pipe.exists(tombstone_key(project_id))
            replies = pipe.execute()
        if project_id is not None and self.channel.takes_over and message.headers is not None:
            message.headers[GONE_HEADER] = bool(replies[-1])
            message.headers[CHECKED_HEADER] = time.time()
        virtual.QoS.append(self, message, delivery_tag)


class Channel(kombu_redis.Channel):
    QoS = QoS
    _wake_key: str | None = None
    _version = 0
    _deferring = False
    _deferred = False
    _broker = None  # the kombu Connection this channel was opened on
    # Set by `use_ready_list` (shared workers): poll the ready list, not project queues.
    ready_mode = False
    _idle = False  # the last take found nothing: block until the bell rings
    _poll_kind = ""
    # What a publish through this channel answered (PUBLISH's return), for `publish`.
    last_put: int | None = None

    def __init__(self, *args, **kwargs):
        # Before kombu's own setup: basic_consume may run during it.
        self._active_key: tuple | None = None
        self._active_cached: list[str] = []
        self._own_queues: list[str] = []  # followed queues that are not a project's
        self._packed_keys: dict[str, bytes] = {}
        self._take_command: bytes | None = None
        self._recorded: set[str] = set()  # delivery tags the take recorded in unacked
        # Delivery tag -> project queue, for messages holding one of its capped slots
        # (released with the message, leases renewed by `renew_slots` meanwhile).
        self._slots: dict[str, str] = {}
        # Takes this channel made and has not added to the served counters yet (the
        # take counts only those of queues given bulk work).
        self._served: collections.Counter[str] = collections.Counter()
        super().__init__(*args, **kwargs)
        self._broker = self.connection.client  # see _connparams

    def _connparams(self, asynchronous=False):
        """kombu's, also once the transport was detached from its connection.

        When a worker loses the broker, Celery detaches the transport
        (`Connection.collect`) and closes the connection; a channel closing after that
        gives its unacknowledged messages back, and task threads still acknowledge.
        Both need a Redis client, whose parameters kombu reads from the transport's
        connection, by then None: an AttributeError nothing expects, which stopped the
        whole worker ("Unrecoverable error") instead of letting it reconnect. The
        channel keeps its own reference to where the broker is.
        """
        transport = self.connection
        if transport.client is not None or self._broker is None:
            return super()._connparams(asynchronous=asynchronous)
        self.connection = _Attached(transport, self._broker)
        try:
            return super()._connparams(asynchronous=asynchronous)
        finally:
            self.connection = transport

    @property
    def takes_over(self) -> bool:
        """Whether this channel polls and publishes its own way (else it is kombu's own)."""
        steps = self.priority_steps
        return (
            kombu_tested()
            and len(steps) == 1
            and not self.priority(steps[0])
            and not self.global_keyprefix
        )

    @property
    def wake_key(self) -> str:
        if self._wake_key is None:
            self._wake_key = f"{WAKE_PREFIX}{uuid.uuid4().hex}"
        return self._wake_key

    # --- publishing -------------------------------------------------------------------------

    def _put(self, queue, message, **kwargs):
        """A message for a project queue: kombu's LPUSH inside the PUBLISH script (the
        guard, the active set, the ready list, in one round trip)."""
        self.last_put = None
        if (
            kwargs.get("_publish_batch") is not None
            or not self.takes_over
            or not is_project_queue(queue)
            or queue in self._expires
        ):
            return super()._put(queue, message, **kwargs)
        with self.conn_or_acquire() as client:
            self.last_put = message_push(client, queue, message)

    def _do_restore_message(self, payload, exchange, routing_key, pipe, leftmost=False):
        """kombu's own, plus listing the queue on the ready list in the same
        transaction: a message put back is never left where no worker looks."""
        super()._do_restore_message(payload, exchange, routing_key, pipe, leftmost)
        queue = lane_base(routing_key or "")
        if not exchange and routing_key and is_project_queue(queue) and self.takes_over:
            if routing_key != queue:  # put back on its bulk lane: mark it (see PUBLISH)
                pipe.hset(FLOW_RULES_KEY, routing_key, "1")
            keys = [READY_MEMBERS_KEY, READY_KEY, READY_BELL_KEY, *lane_keys(queue)]
            pipe.eval(LIST_IF_WAITING, len(keys), *keys, keys_per_project_queue(), queue)

    # --- the followed queues and their cycle ------------------------------------------------

    @property
    def active_queues(self) -> list[str]:
        # Rebuilt only when the followed queues changed (every change goes through
        # _update_queue_cycle); kombu's own property walks them all on every call.
        key = self._snapshot_key()
        if key != self._active_key:
            fanout = self.active_fanout_queues
            active = list(dict.fromkeys(q for q in self._active_queues if q not in fanout))
            packed = self._packed_keys
            self._packed_keys = {q: packed.get(q) or _bulk(q.encode()) for q in active}
            self._active_cached = active
            self._own_queues = [q for q in active if not is_project_queue(q)]
            self._take_command = None
            self._active_key = key
        return self._active_cached

    def _update_queue_cycle(self):
        self._version += 1
        if self._deferring:
            self._deferred = True
            return
        super()._update_queue_cycle()

    @contextlib.contextmanager
    def batched(self) -> Iterator[None]:
        """Follow or leave many queues with one rebuild of the cycle at the end."""
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False
            if self._deferred:
                self._deferred = False
                super()._update_queue_cycle()

    def basic_consume(self, queue, *args, **kwargs):
        current = self._active_key == self._snapshot_key()
        ret = super().basic_consume(queue, *args, **kwargs)
        if current and queue not in self._packed_keys and queue not in self.active_fanout_queues:
            # One more queue: extend the cached list instead of rebuilding it.
            self._active_cached.append(queue)
            self._packed_keys[queue] = _bulk(queue.encode())
            if not is_project_queue(queue):
                self._own_queues.append(queue)
                self._take_command = None
            self._active_key = self._snapshot_key()
        return ret

    def _snapshot_key(self) -> tuple:
        return (self._version, len(self._active_queues), len(self.active_fanout_queues))

    # --- polling ---------------------------------------------------------------------------

    def use_ready_list(self) -> bool:
        """Poll the ready list instead of the followed project queues (a shared worker).
        Returns False where the channel is kombu's own."""
        if not self.takes_over:
            return False
        self._load_take()
        self.ready_mode = True
        self._idle = False
        return True

    def _load_take(self) -> None:
        with self.conn_or_acquire() as client:
            client.script_load(TAKE if flow_control_on() else TAKE_PLAIN)

    def _brpop_start(self, timeout=None):
        if not self.takes_over:
            return super()._brpop_start(timeout)
        if not self.active_queues:
            return
        if self.ready_mode:
            return self._ready_start(timeout)
        queues = self._queue_cycle.items
        packed = self._packed_keys
        try:
            keys = b"".join(map(packed.__getitem__, queues))
        except KeyError:  # a queue the cache does not know: be kombu
            return super()._brpop_start(timeout)
        # The bulk lanes of the project queues, after every interactive list (BRPOP
        # serves the first non-empty key: interactive work first).
        bulk = [_bulk((q + BULK_SUFFIX).encode()) for q in queues if is_project_queue(q)]
        keys += b"".join(bulk)
        extra = len(bulk)
        if timeout is None:
            timeout = self.brpop_timeout
        # kombu's command (BRPOP <queue key>... <timeout>) with the wake key last, so a
        # message waiting in a queue always wins over a wake-up.
        command = b"".join(
            [
                b"*%d\r\n$5\r\nBRPOP\r\n" % (len(queues) + extra + 3),
                keys,
                _bulk(self.wake_key.encode()),
                _bulk(str(timeout or 0).encode()),
            ]
        )
        self._send_poll(command, "BRPOP")

    def _ready_start(self, timeout=None) -> None:
        if self._idle:
            # Nothing to take: sleep on our own queues, the bell and the wake key.
            if timeout is None:
                timeout = self.brpop_timeout
            keys = [*self._own_queues, READY_BELL_KEY, self.wake_key]
            self._send_poll(_command("BRPOP", *keys, str(timeout or 0)), "BRPOP")
            return
        if self._take_command is None:
            script, keys, args = take_call(self.unacked_key, self.unacked_index_key)
            keys += self._own_queues
            self._take_command = _command("EVALSHA", _SHA[script], str(len(keys)), *keys, *args)
        self._send_poll(self._take_command, "EVALSHA")

    def _send_poll(self, command: bytes, kind: str) -> None:
        connection = self.client.connection
        self._in_poll = connection
        self._poll_kind = kind
        self._brpop_sent_at = monotonic()
        connection.send_packed_command([command])

    def _brpop_read(self, **options):
        if not (self.ready_mode and self.takes_over):
            return super()._brpop_read(**options)
        kind = self._poll_kind
        try:
            try:
                reply = self.client.parse_response(self.client.connection, kind, **options)
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            except NoScriptError:
                self._load_take()  # a restarted (or flushed) Redis: load it again
                raise Empty() from None
        finally:
            self._in_poll = None
            self._flush_brpop_reauth()
        if kind == "EVALSHA":
            return self._on_take(reply)
        if not reply:  # the BRPOP timed out: take once (costs nothing if still empty)
            self._idle = False
            raise Empty()
        key, item = bytes_to_str(reply[0]), reply[1]
        self._idle = False
        if key == READY_BELL_KEY or key.startswith(WAKE_PREFIX):
            raise Empty()
        self.connection._deliver(json.loads(bytes_to_str(item)), key)  # one of our queues
        return True

    def _on_take(self, reply):
        if not reply:
            self._idle = True
            raise Empty()
        queue, payload, left = bytes_to_str(reply[0]), bytes_to_str(reply[1]), int(reply[2])
        recorded = bool(int(reply[3]))
        lane = bytes_to_str(reply[5]) if len(reply) > 5 else queue
        self._idle = left == 0
        message = json.loads(payload)
        tag = message["properties"]["delivery_tag"]
        if len(reply) > 4 and int(reply[4]):
            self._slots[tag] = queue
        if len(reply) > 6 and not int(reply[6]) and is_project_queue(queue):
            self._served[queue] += 1  # added to the counters by flush_served
        headers = message.get("headers")
        if isinstance(headers, dict) and is_project_queue(queue):
            # The take checked the tombstone in the same step as the pop.
            headers[GONE_HEADER] = False
            headers[CHECKED_HEADER] = time.time()
        callback = self.connection._callbacks.get(queue) or self._any_callback()
        if callback is None:  # nothing consumes on this channel any more: put it back
            if recorded:
                self.qos.restore_by_tag(tag, leftmost=True)  # the slot with it
            else:
                with self.conn_or_acquire() as client:
                    client.rpush(lane, payload)  # the end its next pop takes from
                    if is_project_queue(queue):
                        list_if_waiting(client, [queue])
            raise Empty()
        if recorded:
            self._recorded.add(tag)
        callback(message)
        return True

    def _any_callback(self):
        """The delivery callback of this channel's consumer: a project queue not
        followed yet (its follow is on the way) is delivered through it, as every queue
        of one Celery consumer is."""
        callbacks = self.connection._callbacks
        for queue in self._own_queues or self._active_queues:
            callback = callbacks.get(queue)
            if callback is not None:
                return callback
        return None

    def renew_slots(self) -> int:
        """Push back the leases of the capped slots this channel's messages hold (the
        worker's timer, every third of the lease). A worker that stops renewing (dead,
        hung) loses its slots when their leases end."""
        slots = list(self._slots.items())
        if not slots or not self.takes_over:
            return 0
        lease = settings.AGENTBUS_SLOT_LEASE_SECONDS  # from Redis's time, as a take's
        keys = [slots_key(queue) for _tag, queue in slots]
        with self.conn_or_acquire() as client:
            return int(run_script(client, RENEW, keys, [lease, *(t for t, _q in slots)]))

    def flush_served(self) -> int:
        """Add the takes this channel counted itself (queues without bulk work) to the
        served counters in one script, except a deleted project's (its teardown removed
        them); the worker's timer calls it with `renew_slots`. Returns how many takes it
        counted. A worker that dies loses what it had not added."""
        served, self._served = self._served, collections.Counter()
        if not served:
            return 0
        pairs = [value for queue, count in served.items() for value in (queue, count)]
        try:
            with self.conn_or_acquire() as client:
                client.eval(
                    _FLUSH_SERVED_LUA, 1, FLOW_STATS_KEY, TOMBSTONE_PREFIX,
                    PROJECT_QUEUE_PREFIX, *pairs,
                )  # fmt: skip
        except Exception:
            self._served.update(served)  # the next flush tries again
            raise
        return sum(served.values())

    def wake(self) -> bool:
        """End the BRPOP in flight (if any) so the next one includes queues just added.
        Returns False where the channel is kombu's own (then the new queues wait for the
        BRPOP timeout, `brpop_timeout`, one second by default)."""
        if not self.takes_over:
            return False
        with self.conn_or_acquire() as client:
            pipe = client.pipeline(transaction=True)
            pipe.delete(self.wake_key)  # at most one wake-up waiting
            pipe.lpush(self.wake_key, "{}")
            pipe.expire(self.wake_key, WAKE_TTL_SECONDS)
            pipe.execute()
        return True


class _Attached:
    """A detached transport seen with the connection it had (`Channel._connparams`)."""

    def __init__(self, transport, client) -> None:
        self._transport, self.client = transport, client

    def __getattr__(self, name):
        return getattr(self._transport, name)


class Transport(kombu_redis.Transport):
    Channel = Channel

    def _deliver(self, message, queue):
        if queue and queue.startswith(WAKE_PREFIX):
            return  # a wake-up, not a message: the poll starts again with every queue
        if queue and queue.endswith(BULK_SUFFIX):
            queue = lane_base(queue)  # a dedicated worker's poll of a bulk lane
        # A BRPOP sent before a consumer was cancelled can still return a message of that
        # queue; kombu then puts it back. When the queue was cancelled because its
        # project was deleted, the message would only wait for the reaper's purge (its
        # task would be skipped anyway): drop it now.
        if queue and queue not in self._callbacks and _deleted_project_queue(queue):
            logger.info("dropping a message for %s: its project was deleted", queue)
            return
        return super()._deliver(message, queue)


def _deleted_project_queue(queue: str) -> bool:
    project_id = project_id_from_queue(queue)
    return project_id is not None and project_gone(project_id)


def wake(channel) -> bool:
    """Wake a worker channel's poll (see `Channel.wake`); False if it cannot be woken."""
    method = getattr(channel, "wake", None)
    return bool(method()) if method is not None else False


def use_ready_list(channel) -> bool:
    """Switch a worker's task channel to the ready list (`Channel.use_ready_list`);
    False where it is kombu's own channel."""
    method = getattr(channel, "use_ready_list", None)
    return bool(method()) if method is not None else False


def renew_slots(channel) -> int:
    """`Channel.renew_slots` where the channel has it."""
    method = getattr(channel, "renew_slots", None)
    return int(method()) if method is not None else 0


# The served counts a channel took itself, added unless the project was deleted meanwhile
# (its teardown removed its counters; a count written after it would outlive it).
# KEYS: the flow stats hash; ARGV: the tombstone prefix, the project queue prefix, then
# (queue, count) pairs.
_FLUSH_SERVED_LUA = """
local prefix_len = string.len(ARGV[2])
for i = 3, #ARGV, 2 do
  local queue = ARGV[i]
  local gone = 0
  if string.sub(queue, 1, prefix_len) == ARGV[2] then
    gone = redis.call('exists', ARGV[1] .. string.sub(queue, prefix_len + 1))
  end
  if gone == 0 then
    redis.call('hincrby', KEYS[1], 'served:' .. queue, ARGV[i + 1])
  end
end
return 1
"""


def flush_served(channel) -> int:
    """`Channel.flush_served` where the channel has it."""
    method = getattr(channel, "flush_served", None)
    return int(method()) if method is not None else 0


def batched(channel):
    """`Channel.batched` where the channel has it, else nothing special."""
    method = getattr(channel, "batched", None)
    return method() if method is not None else contextlib.nullcontext()
