"""The project lifecycle guard: may work for this project run, or be written, now?

`project_gone(project_id)` is the one answer. Every AgentBus task asks it before its body
runs (`AgentBusTask`), long runs ask it between steps, event streams ask it when they
open and each time they wake, the worker's transport asks it before putting back a
message of a cancelled queue, and writes that follow a run ask it to undo themselves.

A deleted project is *tombstoned*: a key in the bus's namespace that lives
AGENTBUS_TOMBSTONE_SECONDS (longer than any message can linger). The races it guards:

- **publish vs delete.** A publish is one Lua script that refuses when the tombstone
  exists (`transport.PUBLISH`; `active.mark_active` where the bus runs on kombu's own
  channel). A publish that got in before the tombstone leaves a message that the
  teardown purges, that a shared worker's poll purges when it meets the queue (the same
  script checks the tombstone), or that a worker skips here.
- **restored unacknowledged messages.** kombu puts a message back when the worker holding
  it dies, possibly after the teardown purged the queue; the task is skipped here.
- **a run that outlives its project.** Runs ask between steps and stop; what they wrote
  after the teardown is removed by them (the teardown set the tombstone before it
  removed anything, so a write that lands after it sees the tombstone).
- **a stream opened after delete.** The stream answers 404; open streams close at their
  next wake-up.
- **a crash between the delete's commit and the tombstone.** The durable teardown record
  (workspaces) is dispatched again by the sweep, which sets the tombstone then.
- **a tombstone on a project that exists** (a wrong teardown): the workspaces app lifts
  it (`project_revive`) once the database shows the project; the bus never sets one
  without being told the project row is gone.
"""

from __future__ import annotations

import uuid

from asgiref.sync import sync_to_async
from django.conf import settings
from django.http import Http404

from common.redis import broker_redis

TOMBSTONE_PREFIX = "uws:bus:tombstone:"


def tombstone_key(project_id: uuid.UUID | str) -> str:
    return TOMBSTONE_PREFIX + uuid.UUID(str(project_id)).hex


def project_gone(project_id: uuid.UUID | str) -> bool:
    """Whether the project was deleted: nothing of it may run or be written any more."""
    return bool(broker_redis().exists(tombstone_key(project_id)))


async def project_gone_async(project_id: uuid.UUID | str, *, client=None) -> bool:
    """`project_gone` for async code; `client` is an asyncio client of the broker's Redis
    (the chat streams' client when the broker shares their Redis)."""
    if client is None:
        return await sync_to_async(project_gone, thread_sensitive=False)(project_id)
    return bool(await client.exists(tombstone_key(project_id)))


def project_tombstone(project_id: uuid.UUID | str) -> None:
    """Mark the project deleted. Only for a project whose row is gone (the caller's
    check): every queued, restored or running task of it stops."""
    broker_redis().set(tombstone_key(project_id), "1", ex=int(settings.AGENTBUS_TOMBSTONE_SECONDS))


def project_revive(project_id: uuid.UUID | str) -> bool:
    """Lift a tombstone set on a project that exists; True if there was one."""
    return bool(broker_redis().delete(tombstone_key(project_id)))


class ProjectGone(Http404):
    """The project was deleted (raised by `publish` and `ensure_project_alive`). An
    Http404, so a request that meets it mid-way answers 404."""


def ensure_project_alive(project_id: uuid.UUID | str) -> None:
    if project_gone(project_id):
        raise ProjectGone(str(project_id))
