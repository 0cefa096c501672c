"""AgentCache: the agent configs of one project, in a Redis hash under the workspace
prefix (agent id -> config JSON), shared by every process that serves the project.

It is the AgentBus's view of the project's agents: a worker resolves the agent of a run
through it. The database stays the source of truth: a miss loads the agent through the
registered agent source and refills the entry, so a flushed cache only costs a query.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from .redis import ScopedRedis
from .registry import AGENT_CACHE_KEY
from .sources import AgentConfig, agent_source


def _agent_id(agent_id: uuid.UUID | str) -> str | None:
    try:
        return str(uuid.UUID(str(agent_id)))
    except ValueError:
        return None


class AgentCache:
    __slots__ = ("redis", "project_id")

    def __init__(self, redis: ScopedRedis, project_id: uuid.UUID):
        self.redis = redis
        self.project_id = project_id

    def fill(self, configs: list[AgentConfig]) -> None:
        """Replace the whole cache with these configs, atomically."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(AGENT_CACHE_KEY)
        if configs:
            pipe.hset(AGENT_CACHE_KEY, mapping={c["id"]: json.dumps(c) for c in configs})
        pipe.execute()

    def peek(self, agent_id: uuid.UUID | str) -> AgentConfig | None:
        """The cached config only; None on a miss."""
        key = _agent_id(agent_id)
        if key is None:
            return None
        raw = self.redis.hget(AGENT_CACHE_KEY, key)
        return json.loads(raw) if raw is not None else None

    def load(self, agent_id: uuid.UUID | str) -> AgentConfig | None:
        """The agent's config from the database, if it belongs to this project."""
        key = _agent_id(agent_id)
        if key is None:
            return None
        return agent_source().config(project_id=self.project_id, agent_id=key)

    def put(self, config: dict[str, Any]) -> None:
        if config.get("project_id") != str(self.project_id):
            raise ValueError("the agent belongs to another project")
        self.redis.hset(AGENT_CACHE_KEY, config["id"], json.dumps(config))

    def remove(self, agent_id: uuid.UUID | str) -> bool:
        key = _agent_id(agent_id)
        return bool(key and self.redis.hdel(AGENT_CACHE_KEY, key))

    def all(self) -> dict[str, AgentConfig]:
        return {k: json.loads(v) for k, v in self.redis.hgetall(AGENT_CACHE_KEY).items()}

    def ids(self) -> set[str]:
        return set(self.redis.hkeys(AGENT_CACHE_KEY))

    def size(self) -> int:
        return self.redis.hlen(AGENT_CACHE_KEY)

    def clear(self) -> None:
        self.redis.delete(AGENT_CACHE_KEY)
