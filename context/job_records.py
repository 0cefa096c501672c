"""Context jobs' records in workspace Redis (teardown's `delete_all` removes them with
the rest of the workspace; they last JOB_TTL_SECONDS, a day):

- `context_job:{job_id}`            a hash with the status of an ingest or clear job;
- `context_job_documents:{job_id}`  the documents an ingest job reads batch by batch;
- `context_job_file:{job_id}`       a file job's bytes (base64) or URL, until it is parsed.
"""

from __future__ import annotations

import base64
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
    """The job's outcome; its documents (and a file job's input) are no longer needed."""
    job_update(redis=redis, job_id=job_id, fields=fields)
    redis.delete(job_documents_key(job_id), job_file_key(job_id))


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
    *, redis: ScopedRedis, job_id: uuid.UUID | str, documents: list[dict[str, Any]]
) -> None:
    """The chunks a parsed file's job stores batch by batch (as an add job's documents)."""
    key = job_documents_key(job_id)
    pipe = redis.pipeline(transaction=True)
    pipe.delete(key)
    if documents:
        pipe.rpush(key, *(json.dumps(d) for d in documents))
        pipe.expire(key, JOB_TTL_SECONDS)
    pipe.delete(job_file_key(job_id))
    pipe.execute()
