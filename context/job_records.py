"""Context jobs' records in workspace Redis (teardown's `delete_all` removes them with
the rest of the workspace; they last JOB_TTL_SECONDS, a day):

- `context_job:{job_id}`            a hash with the status of an ingest or clear job;
- `context_job_documents:{job_id}`  the documents an ingest job reads batch by batch.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from workspaces.redis import ScopedRedis

JOB_TTL_SECONDS = 24 * 3600


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
) -> None:
    """Record a job (and the documents it ingests, read batch by batch by its tasks)."""
    key = job_key(job_id)
    pipe = redis.pipeline(transaction=True)
    pipe.hset(key, mapping={k: json.dumps(v) for k, v in fields.items()})
    pipe.expire(key, JOB_TTL_SECONDS)
    if documents:
        docs = job_documents_key(job_id)
        pipe.rpush(docs, *(json.dumps(d) for d in documents))
        pipe.expire(docs, JOB_TTL_SECONDS)
    pipe.execute()


def job_documents(
    *, redis: ScopedRedis, job_id: uuid.UUID | str, start: int, count: int
) -> list[dict[str, Any]]:
    raw = redis.lrange(job_documents_key(job_id), start, start + count - 1)
    return [json.loads(d) for d in raw]


def job_finish(*, redis: ScopedRedis, job_id: uuid.UUID | str, fields: dict[str, Any]) -> None:
    """The job's outcome; its documents are no longer needed."""
    job_update(redis=redis, job_id=job_id, fields=fields)
    redis.delete(job_documents_key(job_id))


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
