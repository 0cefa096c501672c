"""Flow control on the AgentBus: how the shared pool divides itself among projects.

The rules live in Redis beside the ready list and are applied by the shared workers'
take (agentbus.transport.TAKE), in the same step as the pop, so they hold across every
worker process and host:

- **weight**: under contention a project's queue is served up to `weight` messages per
  turn at the head of the ready list (weighted round robin), so busy projects share the
  pool in proportion to their weights; an idle project is not on the list, and its share
  goes to the others.
- **max in flight** (a cap, 0 for none): at most that many of the project's messages
  are delivered and not yet acknowledged, across all workers. Each holds a *slot* (a
  delivery tag in a sorted set, scored by its lease end) that the worker renews while
  the task runs and gives back when the message is acknowledged, rejected or put back;
  a dead worker's slots come back when their leases end (AGENTBUS_SLOT_LEASE_SECONDS).
  A project at its cap is *parked* off the ready list: its messages wait in its queue,
  not in a worker.
- **lanes**: `publish(..., lane="bulk")` puts a message on the project's bulk list;
  interactive messages (the default) are served first within the project's share, and
  one take in AGENTBUS_BULK_EVERY prefers bulk, so bulk never starves.

Only the Redis bus does this (the channel of agentbus.transport, shared workers); on
kombu's own channel, and with AGENTBUS_FLOW_CONTROL off (the plain round-robin take,
TAKE_PLAIN), the rules are stored but not applied, and a bulk message goes on the
project's one queue. Rules are written by the app that owns projects' settings
(`flow_rules_set`), never read from the database by a worker.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from django.conf import settings

from common.redis import broker_redis

from .keys import FLOW_CREDIT_KEY, FLOW_PARKED_KEY, FLOW_RULES_KEY, FLOW_STATS_KEY
from .queues import is_project_queue, project_id_from_queue, project_queue
from .transport import (
    BULK,
    FLOW_COUNTERS,
    INTERACTIVE,
    LANES,
    flow_control_on,
    lane_keys,
    run_script,
    slots_key,
)

__all__ = [
    "BULK",
    "INTERACTIVE",
    "LANES",
    "FlowStatus",
    "flow_control_on",
    "flow_counters",
    "flow_rules_set",
    "flow_rules_stored",
    "flow_rules_sync",
    "flow_rules_value",
    "flow_status",
]

MAX_WEIGHT = 1000


def flow_rules_set(
    *, project_id: uuid.UUID | str, weight: int | None, max_in_flight: int | None
) -> None:
    """Store a project's rules where the workers' take reads them (next take on).
    `weight` None: the deployment's default (AGENTBUS_DEFAULT_WEIGHT); `max_in_flight`
    None or 0: no cap."""
    value = flow_rules_value(weight=weight, max_in_flight=max_in_flight)
    queue = project_queue(project_id)
    pipe = broker_redis().pipeline(transaction=True)
    if value is None:
        pipe.hdel(FLOW_RULES_KEY, queue)  # the take's defaults: nothing to read
    else:
        pipe.hset(FLOW_RULES_KEY, queue, value)
    pipe.hdel(FLOW_CREDIT_KEY, queue)  # a turn in progress starts again under the new weight
    pipe.execute()


def flow_rules_value(*, weight: int | None, max_in_flight: int | None) -> str | None:
    """How the take reads a project's rules ("<weight> <cap>"), None for the defaults
    (nothing stored). Raises ValueError for rules out of bounds."""
    weight = settings.AGENTBUS_DEFAULT_WEIGHT if weight is None else int(weight)
    cap = int(max_in_flight or 0)
    if not 1 <= weight <= MAX_WEIGHT:
        raise ValueError(f"weight must be 1..{MAX_WEIGHT}")
    if cap < 0:
        raise ValueError("max_in_flight must be 0 (no cap) or more")
    if weight == settings.AGENTBUS_DEFAULT_WEIGHT and cap == 0:
        return None
    return f"{weight} {cap}"


# Set a queue's rules only if they are still what the caller saw before it read what they
# should be (compare and set): a write of `flow_rules_set` in between wins over a re-sync
# that read the database before that write's commit. KEYS: the rules. ARGV: triples of
# queue, rules seen ('' none), rules wanted ('' none). Returns how many were written.
_SYNC = """
local n = 0
for i = 1, #ARGV, 3 do
  if (redis.call('HGET', KEYS[1], ARGV[i]) or '') == ARGV[i + 1] then
    if ARGV[i + 2] == '' then
      redis.call('HDEL', KEYS[1], ARGV[i])
    else
      redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 2])
    end
    n = n + 1
  end
end
return n
"""


def flow_rules_stored() -> dict[str, str]:
    """Every project's rules as the take reads them now: {queue: "<weight> <cap>"}.
    Read this before reading what they should be, and give it to `flow_rules_sync`."""
    return {
        field: value
        for field, value in broker_redis().hscan_iter(FLOW_RULES_KEY, count=1000)
        if is_project_queue(field)
    }


def flow_rules_sync(
    *, stored: dict[str, str], wanted: dict[uuid.UUID | str, str], batch: int = 500
) -> int:
    """Make the stored rules what they should be: `wanted` ({project id: rules value},
    projects with default rules left out), against `stored` (`flow_rules_stored`, read
    before `wanted`). A queue whose rules changed since `stored` was read is left as it
    is (its writer read newer rules). Returns how many queues were written."""
    want = {project_queue(p): v for p, v in wanted.items()}
    triples: list[str] = []
    for queue in stored.keys() | want.keys():
        seen, value = stored.get(queue, ""), want.get(queue, "")
        if seen != value:
            triples += [queue, seen, value]
    written = 0
    client = broker_redis()
    step = 3 * batch
    for start in range(0, len(triples), step):
        chunk = triples[start : start + step]
        written += int(run_script(client, _SYNC, [FLOW_RULES_KEY], chunk))
    return written


@dataclass(frozen=True)
class FlowStatus:
    weight: int
    max_in_flight: int
    in_flight: int  # capped slots held now (0 for a project without a cap)
    waiting: int  # messages in the project's queue, both lanes
    waiting_bulk: int
    parked: bool  # at its cap: off the ready list until a slot comes back
    served: int  # takes since the counters began
    served_bulk: int
    cap_waits: int  # takes refused at the cap


def flow_status(project_ids: list[uuid.UUID | str]) -> dict[str, FlowStatus]:
    """The rules as the workers see them and the live figures, one round trip."""
    pipe = broker_redis().pipeline(transaction=False)
    queues = [project_queue(p) for p in project_ids]
    now = time.time()
    for queue in queues:
        pipe.hget(FLOW_RULES_KEY, queue)
        pipe.zcount(slots_key(queue), now, "+inf")
        for key in lane_keys(queue):
            pipe.llen(key)
        pipe.zscore(FLOW_PARKED_KEY, queue)
        pipe.hmget(FLOW_STATS_KEY, [f"{name}:{queue}" for name in FLOW_COUNTERS])
    replies = iter(pipe.execute())
    out: dict[str, FlowStatus] = {}
    for project_id, queue in zip(project_ids, queues, strict=True):
        rules = next(replies)
        in_flight = int(next(replies))
        lengths = [int(next(replies)) for _ in lane_keys(queue)]
        parked = next(replies) is not None
        served, bulk, capped = (int(v or 0) for v in next(replies))
        weight, cap = settings.AGENTBUS_DEFAULT_WEIGHT, 0
        if rules:
            weight, cap = (int(x) for x in rules.split())
        out[str(uuid.UUID(str(project_id)))] = FlowStatus(
            weight=weight,
            max_in_flight=cap,
            in_flight=in_flight,
            waiting=sum(lengths),
            waiting_bulk=lengths[-1],
            parked=parked,
            served=served,
            served_bulk=bulk,
            cap_waits=capped,
        )
    return out


def flow_counters() -> dict[str, dict[str, int]]:
    """Every project's take counters: {project id: {"served", "bulk", "capped"}}."""
    out: dict[str, dict[str, int]] = {}
    for field, value in broker_redis().hscan_iter(FLOW_STATS_KEY, count=1000):
        name, _, queue = field.partition(":")
        project_id = project_id_from_queue(queue)
        if project_id is None or name not in FLOW_COUNTERS:
            continue
        figures = out.setdefault(str(project_id), dict.fromkeys(FLOW_COUNTERS, 0))
        figures[name] = int(value)
    return out
