"""The shard map: which shards exist, where their spools are, how ingress picks one.

Interface: ``ShardMap(settings)`` with ``spool(shard)``, ``ids()``, ``draining_key``;
``Picker(shard_map, jobs)`` with ``pick() -> int``.

A shard is one spool directory plus its rq queues (``queue_name`` in core.jobs) and Redis keys.
Ingress picks per message: round robin (default), random, or least loaded by queue depth
(IndiMail's modes); a shard listed in the Redis set ``<prefix>:draining`` is never picked. The
draining set and the depths are refreshed at most once a second per process, off the per-message
path, so picking costs no Redis round trip.

Failures: Redis errors while refreshing keep the last known view (the enqueue that follows will
report Redis being down). When every shard is draining, ``pick``
raises ``NoShardAvailable`` and ingress answers 451.

Settings: ``shards``, ``shard_policy``, ``queue_split``, ``spool_dir``/``var_dir``, ``redis_prefix``.
"""

from __future__ import annotations

import itertools
import random
import threading
import time

import redis

from core import jobs
from core.config import Settings
from core.spool import Spool

REFRESH_SECONDS = 1.0


class NoShardAvailable(Exception):
    """Every shard is draining."""


class ShardMap:
    def __init__(self, settings: Settings) -> None:
        self.count = settings.shards
        self.root = settings.spool_root
        self.split = settings.queue_split
        self.prefix = settings.redis_prefix
        self.draining_key = f"{self.prefix}:draining"
        self._spools: dict[int, Spool] = {}
        self._lock = threading.Lock()

    def ids(self) -> range:
        return range(self.count)

    def spool(self, shard: int) -> Spool:
        spool = self._spools.get(shard)
        if spool is None:
            with self._lock:
                spool = self._spools.get(shard)
                if spool is None:
                    spool = self._spools[shard] = Spool(self.root, shard, self.split)
        return spool

    def draining(self, conn: redis.Redis) -> set[int]:
        return {int(x) for x in conn.smembers(self.draining_key)}


class Picker:
    """Chooses the shard for each new message."""

    def __init__(self, shard_map: ShardMap, queues: jobs.Jobs, policy: str = "roundrobin") -> None:
        self.map = shard_map
        self.queues = queues
        self.policy = policy
        self._cycle = itertools.count(random.randrange(shard_map.count))
        self._draining: set[int] = set()
        self._depth: dict[int, int] = {}
        self._refreshed = 0.0
        self._lock = threading.Lock()

    def _refresh(self) -> None:
        now = time.monotonic()
        if now - self._refreshed < REFRESH_SECONDS:
            return
        with self._lock:
            if now - self._refreshed < REFRESH_SECONDS:
                return
            self._refreshed = now
            try:
                self._draining = self.map.draining(self.queues.conn)
                if self.policy == "leastloaded":
                    self._depth = self.queues.depths(self.map.ids())
            except redis.RedisError:
                pass

    def pick(self) -> int:
        self._refresh()
        open_shards = [s for s in self.map.ids() if s not in self._draining]
        if not open_shards:
            raise NoShardAvailable("every shard is draining")
        if self.policy == "random":
            return random.choice(open_shards)
        if self.policy == "leastloaded":
            shard = min(open_shards, key=lambda s: self._depth.get(s, 0))
            self._depth[shard] = self._depth.get(shard, 0) + 1  # spread until the next refresh
            return shard
        return open_shards[next(self._cycle) % len(open_shards)]
