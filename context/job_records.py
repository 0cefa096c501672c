"""Context jobs' records in workspace Redis (teardown's `delete_all` removes them with
the rest of the workspace; they last JOB_TTL_SECONDS, a day):

- `context_job:{job_id}`            a hash with the status of an ingest or clear job;
- `context_job_documents:{job_id}`  the documents an ingest job reads batch by batch;
- `context_job_file:{job_id}`       a file job's bytes (base64) or URL, until it is parsed.

An ingest job goes step by step (parse the file, then each batch), one task on the
project's bus at a time. The hash holds the step owed: `step` (a token its task carries:
a task whose token is no longer the job's does nothing), `next` (the task and its
arguments), `stepped_at` (when it was sent), `holder` (the worker that received it, ""
while it waits on the queue, GIVEN_BACK once its task failed: `failed` says with what
and `failed_at` when) and `lost` (how often in a row it was sent again). Jobs
not ended are listed in one index outside the workspaces (`INDEX_KEY`, a sorted set of
their hashes' full keys, by when the recovery pass last looked at them), where the
recovery pass (context.recovery) finds the steps whose worker died or whose message was
lost. Teardown removes a workspace's jobs from it (context.receivers).
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from typing import Any

from common.redis import get_redis
from workspaces.redis import KEY_NAMESPACE, ScopedRedis

JOB_TTL_SECONDS = 24 * 3600
INDEX_KEY = f"{KEY_NAMESPACE}:context_jobs"
ENDED = ("done", "error")
# The holder of a step whose task failed (step_given_back): no worker has it.
GIVEN_BACK = "given-back"
_NONE = json.dumps("")


def job_key(job_id: uuid.UUID | str) -> str:
    return f"context_job:{uuid.UUID(str(job_id))}"


def job_documents_key(job_id: uuid.UUID | str) -> str:
    return f"context_job_documents:{uuid.UUID(str(job_id))}"


def job_create(
    *,
    redis: ScopedRedis,
    job_id: uuid.UUID | str,
    fields: dict[str, Any],
    documents: list[dict[str, Any]] | None = None,
    step: tuple[str, dict[str, Any]] | None = None,
) -> str:
    """Record a job (and the documents it ingests, read batch by batch by its tasks).
    With `step` (a task's name and arguments), the job is tracked step by step: its
    first step is owed, and the token its task carries is returned."""
    key = job_key(job_id)
    token = ""
    if step is not None:
        token = uuid.uuid4().hex
        fields = {**fields, **_step_fields(token, *step)}
    pipe = redis.pipeline(transaction=True)
    pipe.hset(key, mapping={k: json.dumps(v) for k, v in fields.items()})
    pipe.expire(key, JOB_TTL_SECONDS)
    if documents:
        docs = job_documents_key(job_id)
        pipe.rpush(docs, *(json.dumps(d) for d in documents))
        pipe.expire(docs, JOB_TTL_SECONDS)
    pipe.execute()
    if step is not None:
        get_redis().zadd(INDEX_KEY, {redis.key(key): time.time()})
    return token


def _step_fields(token: str, task: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    return {
        "step": token,
        "next": {"task": task, "kwargs": kwargs},
        "stepped_at": time.time(),
        "holder": "",
    }


# The step owed moves on only from the step that was owed (`after`); with `holder`, only
# if the step is still held by it (the recovery pass: not received meanwhile). A task's
# step resets `lost`; the pass's adds one. Values are JSON, as every field of the hash.
_STEP_NEXT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local status = redis.call('HGET', KEYS[1], 'status')
if status == '"done"' or status == '"error"' then return 0 end
if (redis.call('HGET', KEYS[1], 'step') or ARGV[1]) ~= ARGV[2] then return 0 end
if ARGV[3] ~= '' and (redis.call('HGET', KEYS[1], 'holder') or ARGV[1]) ~= ARGV[3] then
  return 0
end
if ARGV[3] == '' then
  redis.call('HSET', KEYS[1], 'lost', '0')
  redis.call('HDEL', KEYS[1], 'failed', 'failed_at')
else
  redis.call('HINCRBY', KEYS[1], 'lost', 1)
end
for i = 4, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
return 1
"""


def step_next(
    *,
    redis: ScopedRedis,
    job_id: uuid.UUID | str,
    after: str,
    task: str,
    kwargs: dict[str, Any],
    holder: str | None = None,
) -> str | None:
    """Owe the job's next step (`task` with `kwargs`) in place of step `after`; returns
    the new step's token, or None when `after` is no longer the step owed (the recovery
    pass sent it again), the job ended or it is gone. `holder` (the recovery pass):
    only while the step is still held by that worker, and it counts as a loss."""
    token = uuid.uuid4().hex
    fields = [x for k, v in _step_fields(token, task, kwargs).items() for x in (k, json.dumps(v))]
    args = [_NONE, json.dumps(after), "" if holder is None else json.dumps(holder), *fields]
    if not redis.script(_STEP_NEXT, keys=[job_key(job_id)], args=args):
        return None
    return token


_STEP_RECEIVED = """
if (redis.call('HGET', KEYS[1], 'step') or ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], 'holder', ARGV[3])
return 1
"""


def step_received(*, redis: ScopedRedis, job_id: uuid.UUID | str, step: str, worker: str) -> bool:
    """`worker` received the task of step `step` (if it is the step owed)."""
    args = [_NONE, json.dumps(step), json.dumps(worker)]
    return bool(redis.script(_STEP_RECEIVED, keys=[job_key(job_id)], args=args))


_STEP_GIVEN_BACK = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if (redis.call('HGET', KEYS[1], 'step') or ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], 'holder', ARGV[3], 'failed', ARGV[4], 'failed_at', ARGV[5])
return 1
"""


def step_given_back(*, redis: ScopedRedis, job_id: uuid.UUID | str, step: str, error: str) -> bool:
    """Step `step`'s task failed with `error` (if it is still the step owed): no worker
    holds it now, and the recovery pass sends it again."""
    args = [_NONE, json.dumps(step), json.dumps(GIVEN_BACK), json.dumps(error),
            json.dumps(time.time())]  # fmt: skip
    return bool(redis.script(_STEP_GIVEN_BACK, keys=[job_key(job_id)], args=args))


def file_ingest_failed(*, redis: ScopedRedis, status: str, job_id: uuid.UUID | str | None) -> bool:
    """Whether a file's document (its `status` and `job_id`) failed to be ingested: its
    job ended in error, or is gone (lost with Redis, or expired) while the document still
    reads queued or running. Its bytes, given again, are ingested again."""
    if status == "error":
        return True
    if status in ("queued", "running"):
        return job_id is None or not redis.exists(job_key(job_id))
    return False


def step_owed(job: dict[str, Any], step: str) -> bool:
    """Whether `step` is the job's step owed (jobs and tasks from before steps: "")."""
    return job.get("step", "") == step


def index_members(limit: int = 500) -> list[str]:
    """The `limit` jobs not known to have ended that were looked at longest ago (or
    created: index_looked_at), as their hashes' full keys."""
    return get_redis().zrange(INDEX_KEY, 0, limit - 1)


def index_looked_at(members: list[str]) -> None:
    """The recovery pass looked at these jobs: the next pass looks at others first."""
    if members:
        get_redis().zadd(INDEX_KEY, dict.fromkeys(members, time.time()), xx=True)


def index_parse(member: str) -> tuple[int, uuid.UUID, str] | None:
    """(user id, project id, job id) of an index member, None if it is not one."""
    try:
        _, user_id, project_hex, _, job_id = member.split(":")
        return int(user_id), uuid.UUID(project_hex), str(uuid.UUID(job_id))
    except ValueError:
        return None


def index_forget(*members: str) -> None:
    if members:
        get_redis().zrem(INDEX_KEY, *members)


def index_forget_workspace(redis: ScopedRedis) -> int:
    """Forget every job of a workspace (its teardown); returns how many."""
    client = get_redis()
    members = [m for m, _ in client.zscan_iter(INDEX_KEY, match=f"{redis.prefix}*", count=1000)]
    if members:
        client.zrem(INDEX_KEY, *members)
    return len(members)


def job_documents(
    *, redis: ScopedRedis, job_id: uuid.UUID | str, start: int, count: int
) -> list[dict[str, Any]]:
    raw = redis.lrange(job_documents_key(job_id), start, start + count - 1)
    return [json.loads(d) for d in raw]


def job_finish(*, redis: ScopedRedis, job_id: uuid.UUID | str, fields: dict[str, Any]) -> None:
    """The job's outcome; its documents (and a file job's input) are no longer needed."""
    job_update(redis=redis, job_id=job_id, fields=fields)
    redis.delete(job_documents_key(job_id), job_file_key(job_id))
    index_forget(redis.key(job_key(job_id)))


def job_discard(*, redis: ScopedRedis, job_id: uuid.UUID | str) -> None:
    """Remove a job that never went on the bus (its request failed): nothing of it is
    left for the recovery pass to send."""
    redis.delete(job_key(job_id), job_documents_key(job_id), job_file_key(job_id))
    index_forget(redis.key(job_key(job_id)))


def job_update(*, redis: ScopedRedis, job_id: uuid.UUID | str, fields: dict[str, Any]) -> bool:
    """Update a job that still exists; a workspace torn down meanwhile stays empty."""
    key = job_key(job_id)
    if not redis.exists(key):
        return False
    redis.hset(key, mapping={k: json.dumps(v) for k, v in fields.items()})
    return True


def job_get(*, redis: ScopedRedis, job_id: uuid.UUID | str) -> dict[str, Any] | None:
    raw = redis.hgetall(job_key(job_id))
    if not raw:
        return None
    return {k: json.loads(v) for k, v in raw.items()}


def job_file_key(job_id: uuid.UUID | str) -> str:
    return f"context_job_file:{uuid.UUID(str(job_id))}"


def job_file_put(
    *, redis: ScopedRedis, job_id: uuid.UUID | str, data: bytes | None, url: str
) -> None:
    """A file job's input, for its worker: the bytes (base64: the client decodes
    responses) or the URL to fetch."""
    value = {"url": url} if data is None else {"data": base64.b64encode(data).decode("ascii")}
    redis.set(job_file_key(job_id), json.dumps(value), ex=JOB_TTL_SECONDS)


def job_file_get(*, redis: ScopedRedis, job_id: uuid.UUID | str) -> tuple[bytes | None, str]:
    """(bytes, "") or (None, url); (None, "") when the input is gone."""
    raw = redis.get(job_file_key(job_id))
    if not raw:
        return None, ""
    value = json.loads(raw)
    if "data" in value:
        return base64.b64decode(value["data"]), ""
    return None, value.get("url", "")


def job_documents_put(
    *,
    redis: ScopedRedis,
    job_id: uuid.UUID | str,
    documents: list[dict[str, Any]],
    fields: dict[str, Any],
) -> None:
    """The chunks a parsed file's job stores batch by batch (as an add job's documents),
    with `fields` (their count: `documents`) in the same transaction: a job that has the
    field is parsed, and its file is gone. Nothing is written for a job that is gone
    (its workspace torn down meanwhile)."""
    if not redis.exists(job_key(job_id)):
        return
    key = job_documents_key(job_id)
    pipe = redis.pipeline(transaction=True)
    pipe.delete(key)
    if documents:
        pipe.rpush(key, *(json.dumps(d) for d in documents))
        pipe.expire(key, JOB_TTL_SECONDS)
    pipe.delete(job_file_key(job_id))
    pipe.hset(job_key(job_id), mapping={k: json.dumps(v) for k, v in fields.items()})
    pipe.execute()
