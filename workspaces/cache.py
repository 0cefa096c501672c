"""AgentCache: the agent configs of one project, in a Redis hash under the workspace
prefix (agent id -> config JSON), shared by every process that serves the project.

The database stays the source of truth: a miss loads the agent from the database
and refills the entry, so a flushed cache only costs a query.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from .redis import ScopedRedis
from .registry import AGENTS_KEY


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

    def fill(self, configs: list[dict[str, Any]]) -> None:
        """Replace the whole cache with these configs, atomically."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(AGENTS_KEY)
        if configs:
            pipe.hset(AGENTS_KEY, mapping={c["id"]: json.dumps(c) for c in configs})
        pipe.execute()

    def get(self, agent_id: uuid.UUID | str) -> dict[str, Any] | None:
        """The cached config, or the database's (refilling the cache), or None."""
        config = self.peek(agent_id)
        if config is not None:
            return config
        config = self.load(agent_id)
        if config is not None:
            self.put(config)
        return config

    def peek(self, agent_id: uuid.UUID | str) -> dict[str, Any] | None:
        """The cached config only; None on a miss."""
        key = _agent_id(agent_id)
        if key is None:
            return None
        raw = self.redis.hget(AGENTS_KEY, key)
        return json.loads(raw) if raw is not None else None

    def load(self, agent_id: uuid.UUID | str) -> dict[str, Any] | None:
        """The agent's config from the database, if it belongs to this project."""
        from agents.models import Agent
        from agents.selectors import agent_config

        key = _agent_id(agent_id)
        if key is None:
            return None
        agent = Agent.objects.filter(project_id=self.project_id, id=key).first()
        return agent_config(agent) if agent is not None else None

    def put(self, config: dict[str, Any]) -> None:
        if config.get("project_id") != str(self.project_id):
            raise ValueError("the agent belongs to another project")
        self.redis.hset(AGENTS_KEY, config["id"], json.dumps(config))

    def remove(self, agent_id: uuid.UUID | str) -> bool:
        key = _agent_id(agent_id)
        return bool(key and self.redis.hdel(AGENTS_KEY, key))

    def all(self) -> dict[str, dict[str, Any]]:
        return {k: json.loads(v) for k, v in self.redis.hgetall(AGENTS_KEY).items()}

    def ids(self) -> set[str]:
        return set(self.redis.hkeys(AGENTS_KEY))

    def size(self) -> int:
        return self.redis.hlen(AGENTS_KEY)

    def clear(self) -> None:
        self.redis.delete(AGENTS_KEY)
