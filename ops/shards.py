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
from rq.registry import StartedJobRegistry

from core.config import Settings
from core.envelope import CHANNELS
from core.jobs import Jobs
from core.shards import ShardMap


@dataclass(frozen=True, slots=True)
class ShardRow:
    shard: int
    state: str  # open, draining, paused (a rebalance holds it)
    spooled: int
    queued: int | None  # ready + in flight, every channel (None: Redis unavailable)
    deferred: int | None  # entries in the retry set
    path: str


def listing(settings: Settings, conn: redis.Redis | None) -> list[ShardRow]:
    shard_map = ShardMap(settings)
    ids = shard_map.ids(fresh=True)
    draining = shard_map.draining()
    answers: list[int] = []
    if conn is not None:
        jobs = Jobs(conn, settings.redis_prefix)
        try:
            with conn.pipeline(transaction=False) as pipe:
                for shard in ids:
                    for channel in CHANNELS:
                        queue = jobs.queue(shard, channel)
                        pipe.llen(queue.key)
                        pipe.zcard(StartedJobRegistry(queue=queue).key)
                    pipe.zcard(jobs.retry_key(shard))
                    pipe.exists(shard_map.pause_key(shard))
                answers = pipe.execute()
        except redis.RedisError:
            answers = []
    rows = []
    step = 2 * len(CHANNELS) + 2
    for n, shard in enumerate(ids):
        cells = answers[n * step:(n + 1) * step] if answers else None
        state = "paused" if cells and cells[-1] else "draining" if shard in draining else "open"
        rows.append(ShardRow(shard, state, shard_map.spool(shard).count(),
                             sum(cells[:-2]) if cells else None, cells[-2] if cells else None,
                             str(shard_map.spool(shard).base)))
    return rows


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
