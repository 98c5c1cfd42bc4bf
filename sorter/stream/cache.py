"""Recent decisions per item, in Redis, so repeated frames of one item get one command.

One round trip per batch to look up (``MGET``), one pipelined round trip to store (``SET EX`` per
item). Redis is an optimisation, never a dependency: when it fails, the cache reports itself down,
the worker routes without it (every frame is classified; duplicates are then possible), and it is
tried again after ``retry_after_s``.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import Protocol

import redis

from sorter.logs import get_logger

log = get_logger("sorter.cache")


class DecisionCache(Protocol):
    def get_many(self, item_ids: list[str]) -> dict[str, dict]: ...

    def put_many(self, decisions: Mapping[str, dict]) -> None: ...

    @property
    def available(self) -> bool: ...

    def close(self) -> None: ...


class NoCache:
    available = False

    def get_many(self, item_ids: list[str]) -> dict[str, dict]:
        return {}

    def put_many(self, decisions: Mapping[str, dict]) -> None:
        return None

    def close(self) -> None:
        return None


class MemoryCache:
    """In-process cache with the same contract, for unit tests, single-process replays and the shadow model;
    ``max_items``: the oldest written go first beyond it (None: unbounded)."""

    def __init__(self, max_items: int | None = None) -> None:
        self.data: OrderedDict[str, dict] = OrderedDict()
        self.max_items = max_items
        self.available = True

    def get_many(self, item_ids: list[str]) -> dict[str, dict]:
        return {i: self.data[i] for i in item_ids if i in self.data}

    def put_many(self, decisions: Mapping[str, dict]) -> None:
        for item_id, decision in decisions.items():
            self.data[item_id] = decision
            self.data.move_to_end(item_id)
        while self.max_items is not None and len(self.data) > self.max_items:
            self.data.popitem(last=False)

    def close(self) -> None:
        return None


class RedisDecisionCache:
    def __init__(
        self,
        url: str,
        *,
        ttl_s: int,
        key_prefix: str = "sorter:decision:",
        timeout_s: float = 0.25,
        retry_after_s: float = 2.0,
        clock=time.monotonic,
    ) -> None:
        self.client = redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry_on_timeout=False
        )
        self.ttl_s = ttl_s
        self.prefix = key_prefix
        self.retry_after_s = retry_after_s
        self.clock = clock
        self._down_since: float | None = None
        self._retry_at = 0.0
        self.errors = 0

    @property
    def available(self) -> bool:
        return self._down_since is None

    def _usable(self) -> bool:
        return self._down_since is None or self.clock() >= self._retry_at

    def _failed(self, op: str, exc: Exception) -> None:
        self.errors += 1
        if self._down_since is None:
            self._down_since = self.clock()
            log.warning("cache.down", op=op, error=f"{type(exc).__name__}: {exc}", retry_after_s=self.retry_after_s)
        self._retry_at = self.clock() + self.retry_after_s

    def _succeeded(self) -> None:
        if self._down_since is not None:
            log.info("cache.recovered", down_s=round(self.clock() - self._down_since, 3))
            self._down_since = None

    def get_many(self, item_ids: list[str]) -> dict[str, dict]:
        if not item_ids or not self._usable():
            return {}
        try:
            values = self.client.mget([self.prefix + i for i in item_ids])
        except redis.RedisError as exc:
            self._failed("get", exc)
            return {}
        self._succeeded()
        found = {}
        for item_id, value in zip(item_ids, values, strict=True):
            if value is not None:
                try:
                    found[item_id] = json.loads(value)
                except ValueError:
                    log.warning("cache.bad_entry", item_id=item_id)
        return found

    def put_many(self, decisions: Mapping[str, dict]) -> None:
        if not decisions or not self._usable():
            return
        try:
            pipe = self.client.pipeline(transaction=False)
            for item_id, decision in decisions.items():
                pipe.set(self.prefix + item_id, json.dumps(decision), ex=self.ttl_s)
            pipe.execute()
        except redis.RedisError as exc:
            self._failed("put", exc)
            return
        self._succeeded()

    def close(self) -> None:
        """Close the connection pool (on stop)."""
        self.client.close()
        self.client.connection_pool.disconnect()
