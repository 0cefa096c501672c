"""The workspace's door to Redis: `ScopedRedis` prefixes every key with the workspace
prefix, so one workspace cannot name another's keys, and a command it does not know how
to scope is refused rather than passed through.

The one way to an unscoped client is `common.redis.get_redis()`; workspace code takes
`scoped(user_id, project_id)` instead.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

from redis.commands.core import Script

from common.redis import get_redis

KEY_NAMESPACE = "uws"


def workspace_prefix(user_id: int | str, project_id: uuid.UUID | str) -> str:
    """The prefix every Redis key of one workspace lives under."""
    return f"{KEY_NAMESPACE}:{int(user_id)}:{uuid.UUID(str(project_id)).hex}:"


_scripts: dict[str, Script] = {}

# Commands whose first argument is the only key.
_SINGLE_KEY = frozenset(
    """
    get set setnx setex psetex getset getdel getex incr incrby decr decrby incrbyfloat
    expire pexpire expireat pexpireat ttl pttl persist type strlen append
    hget hset hsetnx hmget hgetall hdel hexists hincrby hincrbyfloat hkeys hvals hlen hscan_iter
    lpush rpush lpop rpop llen lrange lrem ltrim lindex lset
    sadd srem smembers sismember smismember scard spop srandmember sscan_iter
    zadd zrem zscore zrange zrangebyscore zrevrange zcard zincrby zremrangebyscore zcount
    xadd xlen xrange xrevrange xtrim xdel xinfo_stream
    publish lock
    """.split()
)
# Commands whose every positional argument is a key.
_ALL_KEYS = frozenset("delete unlink exists touch".split())
# Passed through untouched: they name no key.
_PASSTHROUGH = frozenset("execute reset ping close".split())


class ScopedRedis:
    """A Redis client (sync or asyncio, or a pipeline) confined to one key prefix."""

    __slots__ = ("_client", "prefix")

    def __init__(self, client: Any, prefix: str):
        if not prefix.endswith(":"):
            raise ValueError("a workspace prefix ends with ':'")
        self._client = client
        self.prefix = prefix

    def key(self, name: str) -> str:
        """The full Redis key for a workspace-relative name."""
        return self.prefix + name

    def __getattr__(self, command: str) -> Any:
        method = getattr(self._client, command)
        if command in _SINGLE_KEY:
            return lambda name, *args, **kwargs: method(self.prefix + name, *args, **kwargs)
        if command in _ALL_KEYS:
            return lambda *names: method(*(self.prefix + n for n in names))
        if command in _PASSTHROUGH:
            return method
        raise AttributeError(f"ScopedRedis does not scope the command {command!r}")

    def xread(self, streams: dict[str, Any], **kwargs: Any) -> Any:
        return self._client.xread({self.prefix + k: v for k, v in streams.items()}, **kwargs)

    def script(self, source: str, *, keys: list[str], args: list[Any]) -> Any:
        """Run a Lua script on keys of this workspace (given workspace-relative)."""
        script = _scripts.get(source)
        if script is None:
            script = _scripts[source] = Script(get_redis(), source)
        return script(keys=[self.prefix + k for k in keys], args=args, client=self._client)

    def pipeline(self, transaction: bool = True) -> ScopedRedis:
        return ScopedRedis(self._client.pipeline(transaction=transaction), self.prefix)

    def scan_iter(self, match: str = "*", count: int = 500) -> Iterator[str]:
        """Workspace-relative names of this workspace's keys (sync clients only)."""
        cut = len(self.prefix)
        for full in self._client.scan_iter(match=self.prefix + match, count=count):
            yield full[cut:]

    def delete_all(self) -> int:
        """Remove every key under the prefix; returns how many were removed."""
        removed = 0
        batch: list[str] = []
        for full in self._client.scan_iter(match=self.prefix + "*", count=1000):
            batch.append(full)
            if len(batch) >= 500:
                removed += self._client.unlink(*batch)
                batch.clear()
        if batch:
            removed += self._client.unlink(*batch)
        return removed


def scoped(user_id: int | str, project_id: uuid.UUID | str) -> ScopedRedis:
    return ScopedRedis(get_redis(), workspace_prefix(user_id, project_id))


def scoped_async(client: Any, user_id: int | str, project_id: uuid.UUID | str) -> ScopedRedis:
    return ScopedRedis(client, workspace_prefix(user_id, project_id))
