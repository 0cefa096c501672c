"""Names of the bus-wide Redis keys, in one place (below every other module of the bus).

They live beside the broker's queues (the Lua scripts read both) under the `uws:bus:`
namespace: never under a workspace prefix, which teardown wipes.
"""

from __future__ import annotations

# Active project queues (queue -> last publish time): what the shared workers follow.
ACTIVE_KEY = "uws:bus:active"
# Queues taken out of the active set (queue -> when), watched for messages put back.
RETIRED_KEY = "uws:bus:retired"
# Present while a full keyspace scan for stranded queues is not due.
FULL_SCAN_KEY = "uws:bus:rescue-scan"
# Workers' heartbeats: "hostname mode incarnation" -> last beat (agentbus.worker).
WORKERS_KEY = "uws:bus:workers"

# The ready list: project queues that hold messages, in round-robin order. A queue is in
# READY_MEMBERS_KEY exactly when it has one entry in READY_KEY (both change only inside
# the Lua scripts of agentbus.transport), so a queue is never listed twice.
READY_KEY = "uws:bus:ready"
READY_MEMBERS_KEY = "uws:bus:ready:members"
# At most one token: "the ready list has work", for a shared worker that sleeps.
READY_BELL_KEY = "uws:bus:ready:bell"
# Present while the periodic re-listing of stranded queues is not due (one worker a period).
READY_SWEEP_KEY = "uws:bus:ready:sweep"

# Wake keys of worker channels (one each).
WAKE_PREFIX = "uws:bus:wake:"

# Flow control (agentbus.flow): the rules of each project queue ("<weight> <cap>"), the
# credit a queue has left in its turn at the head of the ready list (weighted round
# robin), queues parked at their cap (queue -> when a slot's lease ends), counters, and
# per queue the slots of its messages in flight (delivery tag -> lease end).
FLOW_RULES_KEY = "uws:bus:flow:rules"
# Beside the rules (the take reads them in one HMGET with a queue's): "<queue>:bulk"
# marks a queue given bulk work (lane turns owed), and this field holds the earliest
# time a parked queue is due to be looked at again.
FLOW_PARKED_DUE_FIELD = "@parked-due"
FLOW_CREDIT_KEY = "uws:bus:flow:credit"
FLOW_PARKED_KEY = "uws:bus:flow:parked"
FLOW_STATS_KEY = "uws:bus:flow:stats"
FLOW_SLOTS_PREFIX = "uws:bus:flow:slots:"
# A project's bulk lane: a list beside its queue's (same messages, served after the
# interactive ones, one turn in BULK_EVERY at least).
BULK_SUFFIX = ":bulk"
