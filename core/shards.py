"""The shard map: which shards exist, where their spools are, how ingress picks one.

Interface: ``shard_label(shard)`` (``s<N>``: a shard's name on its node: spool directories, logs and
listings); ``Namespace(prefix, node)`` (``Namespace.of(settings)``): where a node's shards live in
the cluster's Redis, ``address(shard)`` (``<node>/s<N>``, the shard's name in the cluster: Redis
keys, metric labels), ``key(kind, shard)``, ``shared(kind)``; ``ShardMap(settings)`` with
``spool(shard)``, ``ids()``, ``draining()``, ``drain(shard)``, ``reopen(shard)``, ``add() -> int``,
``pause_key(shard)``; ``Picker(shard_map, jobs)`` with ``pick() -> int``.

A shard is one spool directory ``<spool root>/s<N>`` plus its rq queues (``queue_name`` in
core.jobs) and Redis keys. A cluster's nodes share one Redis deployment under one ``redis_prefix``;
each node's per-shard keys carry its name (``<prefix>:<kind>:<node>/s<N>``), so a node reaches
only its own shards' keys, while what is shared by the cluster on purpose (rate limits, AUTH
throttles, the autoresponder's memory, the node registry) sits under ``shared(kind)``.

The spool root is the truth about which shards exist: the shards are ``0 .. shards-1`` from the
settings plus every ``s<N>`` directory found there, so ``shards add`` (a new directory, built aside
and renamed into place, then the root fsync'd) is seen by every running process within
``REFRESH_SECONDS`` without a restart, and lowering ``shards`` in the settings never hides a shard
that still holds mail. A shard is *draining* while its directory holds a ``draining`` file (durable,
so a Redis restart does not reopen it): ingress never picks it, its workers go on emptying it.

``pause_key(shard)`` names the Redis key (with an expiry, renewed by its holder) under which the
rebalancer has a shard to itself: consumers claim nothing from a paused shard and the scheduler
leaves it alone (core.jobs' claim script, core.lease's renewal script check it atomically).

Ingress picks per message: round robin (default), random, or least loaded by queue depth
(IndiMail's modes), never a draining shard. The shard list, the draining markers and the depths
are refreshed at most once a second per process, off the per-message path, so picking costs no
system call and no Redis round trip.

Failures: Redis errors while refreshing depths keep the last known view (the enqueue that follows
will report Redis being down). When every shard is draining, ``pick`` raises ``NoShardAvailable``
and ingress answers 451. ``add`` raises OSError (disk) and leaves no half-built shard visible.

Settings: ``shards``, ``shard_policy``, ``queue_split``, ``spool_dir``/``var_dir``, ``redis_prefix``,
``node``.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import random
import re
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import redis

from core.config import Settings
from core.spool import Spool, fsync_dir

if TYPE_CHECKING:  # core.jobs names its keys with shard_label: imported where used, not at load
    from core.jobs import Jobs

REFRESH_SECONDS = 1.0
DRAINING = "draining"  # the marker file in a shard's directory
LABEL_PATTERN = r"s(\d+)"  # what shard_label writes, for the readers of names (one group: the number)
_SHARD_DIR = re.compile(LABEL_PATTERN)


def shard_label(shard: int) -> str:
    """A shard's name on its own node: spool directories, logs, listings."""
    return f"s{shard}"


@dataclass(frozen=True, slots=True)
class Namespace:
    """One node's place in the cluster's Redis: the cluster's ``prefix`` and the node's name."""

    prefix: str
    node: str

    @classmethod
    def of(cls, settings: Settings) -> Namespace:
        return cls(settings.redis_prefix, settings.node)

    def address(self, shard: int) -> str:
        """The shard's name in the cluster: ``<node>/s<N>``."""
        return f"{self.node}/{shard_label(shard)}"

    def key(self, kind: str, shard: int) -> str:
        """A per-shard Redis key: ``<prefix>:<kind>:<node>/s<N>``."""
        return f"{self.prefix}:{kind}:{self.address(shard)}"

    def shared(self, kind: str) -> str:
        """A key every node of the cluster uses alike: ``<prefix>:<kind>``."""
        return f"{self.prefix}:{kind}"


class NoShardAvailable(Exception):
    """Every shard is draining."""


class ShardMap:
    def __init__(self, settings: Settings) -> None:
        self.count = settings.shards
        self.root = Path(settings.spool_root)
        self.split = settings.queue_split
        self.space = Namespace.of(settings)
        self._spools: dict[int, Spool] = {}
        self._lock = threading.Lock()
        self._ids: list[int] = list(range(self.count))
        self._listed = -1e9

    def ids(self, fresh: bool = False) -> list[int]:
        """Every shard, ascending: the configured ones and any other the spool root holds."""
        now = time.monotonic()
        if fresh or now - self._listed >= REFRESH_SECONDS:
            self._listed = now
            found = set(range(self.count))
            with contextlib.suppress(FileNotFoundError):
                for name in os.listdir(self.root):
                    match = _SHARD_DIR.fullmatch(name)
                    if match:
                        found.add(int(match.group(1)))
            self._ids = sorted(found)
        return self._ids

    def spool(self, shard: int) -> Spool:
        spool = self._spools.get(shard)
        if spool is None:
            with self._lock:
                spool = self._spools.get(shard)
                if spool is None:
                    spool = self._spools[shard] = Spool(self.root, shard, self.split)
        return spool

    def pause_key(self, shard: int) -> str:
        from core.jobs import pause_key

        return pause_key(self.space, shard)

    def _marker(self, shard: int) -> Path:
        return Spool.directory(self.root, shard) / DRAINING

    def draining(self) -> set[int]:
        return {shard for shard in self.ids() if self._marker(shard).exists()}

    def drain(self, shard: int) -> bool:
        """Mark the shard draining (durably); False if it already was."""
        marker = self._marker(self._existing(shard))
        if marker.exists():
            return False
        marker.write_text("ingress picks no new mail for this shard; `shardmail shards open` undoes it\n")
        fsync_dir(marker.parent)
        return True

    def reopen(self, shard: int) -> bool:
        """Undo ``drain``; False if the shard was not draining."""
        marker = self._marker(self._existing(shard))
        try:
            marker.unlink()
        except FileNotFoundError:
            return False
        fsync_dir(marker.parent)
        return True

    def _existing(self, shard: int) -> int:
        if shard not in self.ids(fresh=True):
            raise KeyError(f"no such shard: {shard}")
        self.spool(shard)  # a configured shard's directories may not exist yet
        return shard

    def add(self) -> int:
        """Create the next shard online: its spool is built under a temporary name, made durable,
        then renamed into place (one atomic step: a crash leaves either no new shard or a whole one;
        a leftover ``.adding-*`` directory is removed by the next ``add``). Returns its number."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".shards.lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            shard = max(self.ids(fresh=True), default=-1) + 1
            for leftover in self.root.glob(".adding-*"):
                shutil.rmtree(leftover, ignore_errors=True)
            staging = self.root / f".adding-{os.getpid()}"
            built = Spool(staging, shard, self.split)
            for directory in (built.queue, built.base):
                fsync_dir(directory)
            fsync_dir(staging)
            os.rename(built.base, Spool.directory(self.root, shard))
            fsync_dir(self.root)
            os.rmdir(staging)
            self.ids(fresh=True)
            return shard


class Picker:
    """Chooses the shard for each new message."""

    def __init__(self, shard_map: ShardMap, queues: Jobs, policy: str = "roundrobin") -> None:
        self.map = shard_map
        self.queues = queues
        self.policy = policy
        self._cycle = itertools.count(random.randrange(max(1, shard_map.count)))
        self._open: list[int] = shard_map.ids()
        self._depth: dict[int, int] = {}
        self._refreshed = -1e9
        self._lock = threading.Lock()

    def _refresh(self) -> None:
        now = time.monotonic()
        if now - self._refreshed < REFRESH_SECONDS:
            return
        with self._lock:
            if now - self._refreshed < REFRESH_SECONDS:
                return
            self._refreshed = now
            draining = self.map.draining()
            self._open = [s for s in self.map.ids() if s not in draining]
            if self.policy == "leastloaded":
                with contextlib.suppress(redis.RedisError):
                    self._depth = self.queues.depths(self._open)

    def pick(self) -> int:
        self._refresh()
        open_shards = self._open
        if not open_shards:
            raise NoShardAvailable("every shard is draining")
        if self.policy == "random":
            return random.choice(open_shards)
        if self.policy == "leastloaded":
            shard = min(open_shards, key=lambda s: self._depth.get(s, 0))
            self._depth[shard] = self._depth.get(shard, 0) + 1  # spread until the next refresh
            return shard
        return open_shards[next(self._cycle) % len(open_shards)]
