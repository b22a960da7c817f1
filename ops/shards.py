"""``shardmail shards list|drain|open|add``: the admin's view of the queue shards, and changing them.

Interface: ``listing(settings, conn) -> list[ShardRow]``, ``render(rows) -> str``,
``wait_empty(settings, conn, shard, timeout, out) -> bool`` (``drain --wait``).

``drain S`` marks the shard draining (a file in its spool directory, see core.shards): ingress
stops choosing it at once (within a second), its workers go on emptying it, and deferred mail
there waits for its retries as before (``rebalance`` moves it elsewhere now). ``open S`` undoes
it. ``add`` creates the next shard online; ingress processes, pools serving every shard, and the
scheduler take it up within a second (ingress) or a heartbeat (pools) without a restart.

Failures: Redis unavailable → the listing shows the spool only (queued counts as ``-``).
Settings: those of core.shards.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TextIO

import redis

from core.config import Settings
from core.shards import ShardMap
from ops.depth import gather


@dataclass(frozen=True, slots=True)
class ShardRow:
    shard: int
    state: str  # open, draining, paused (a rebalance holds it)
    spooled: int
    queued: int | None  # ready + in flight, every channel (None: Redis unavailable)
    deferred: int | None  # entries in the retry set
    path: str


def listing(settings: Settings, conn: redis.Redis | None) -> list[ShardRow]:
    """The shards as ``shardmail status`` sees them (ops.depth), a line each."""
    try:
        status = gather(settings, conn)
    except redis.RedisError:
        status = gather(settings, None)
    shard_map = ShardMap(settings)
    return [ShardRow(row.shard, row.state, row.spooled,
                     sum(c.ready + c.in_flight for c in row.channels.values()) if status.redis else None,
                     row.deferred if status.redis else None, str(shard_map.spool(row.shard).base))
            for row in status.shards]


def render(rows: list[ShardRow]) -> str:
    lines = [f"{'shard':>5} {'state':<9} {'spooled':>8} {'queued':>8} {'deferred':>8}  spool"]
    for row in rows:
        queued = "-" if row.queued is None else str(row.queued)
        deferred = "-" if row.deferred is None else str(row.deferred)
        lines.append(f"{row.shard:>5} {row.state:<9} {row.spooled:>8} {queued:>8} {deferred:>8}  {row.path}")
    return "\n".join(lines)


def wait_empty(settings: Settings, conn: redis.Redis, shard: int, timeout: float, out: TextIO) -> bool:
    """Until the shard's spool is empty (True) or ``timeout`` seconds passed (False)."""
    spool = ShardMap(settings).spool(shard)
    deadline = time.monotonic() + timeout
    while True:
        left = spool.count()
        if not left:
            return True
        if time.monotonic() > deadline:
            out.write(f"shard {shard}: {left} messages still spooled\n")
            return False
        time.sleep(0.5)
