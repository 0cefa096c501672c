"""Request/reply between a waiting web request and a worker, in workspace Redis.

- `reply:{request_id}`  a one-entry stream the worker answers on; the waiting request
  hears it through its process's stream hub (realtime.streamhub).
- in-flight counters per user and per project bound how many requests wait at once.
"""

from __future__ import annotations

import json
import uuid

from workspaces.redis import ScopedRedis

REPLY_TTL_SECONDS = 120


def reply_key(request_id: uuid.UUID | str) -> str:
    return f"reply:{uuid.UUID(str(request_id))}"


def reply_send(*, redis: ScopedRedis, request_id: uuid.UUID | str, payload: dict) -> None:
    key = reply_key(request_id)
    pipe = redis.pipeline(transaction=True)
    pipe.xadd(key, {"data": json.dumps(payload)})
    pipe.expire(key, REPLY_TTL_SECONDS)
    pipe.publish(key, "")  # a waiting web request hears it through its hub
    pipe.execute()


def reply_payload(entry_fields: dict[str, str]) -> dict:
    return json.loads(entry_fields["data"])


# Count one more request in flight for a user and a project, unless either is at its
# limit. KEYS: user counter, project counter. ARGV: user limit, project limit, ttl.
# Returns 1 (admitted) or 0.
ADMIT = """
local user = redis.call('INCR', KEYS[1])
local project = redis.call('INCR', KEYS[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[3])
if user > tonumber(ARGV[1]) or project > tonumber(ARGV[2]) then
  redis.call('DECR', KEYS[1])
  redis.call('DECR', KEYS[2])
  return 0
end
return 1
"""


def inflight_keys(*, user_id: int, project_prefix: str, kind: str) -> list[str]:
    """Full keys of the in-flight counters of one kind of request (`project_prefix`:
    the workspace's key prefix, so the project's counter goes with its workspace)."""
    return [f"uws:user:{int(user_id)}:inflight:{kind}", f"{project_prefix}inflight:{kind}"]
