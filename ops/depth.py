"""Queue depth per shard and channel: the first view an operator wants (``shardmail status``).

Interface: ``shard_depths(settings, conn) -> list[ShardDepth]``, ``render(rows) -> str``,
``as_json(rows) -> str``. Counts come from rq's own structures (queue lists, started and failed
registries: one pipelined round trip for all shards) and from the spool (messages on disk, the
truth that Redis only rings the bell for).

Failures: Redis down raises ``redis.RedisError``; the CLI reports it and still shows spool counts.
Settings: ``shards``, ``redis_prefix``, ``spool_dir``/``var_dir``, ``queue_split``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import redis
from rq.registry import FailedJobRegistry, StartedJobRegistry

from core.config import Settings
from core.envelope import CHANNELS
from core.jobs import Jobs
from core.shards import ShardMap


@dataclass(frozen=True, slots=True)
class ShardDepth:
    shard: int
    draining: bool
    spooled: int  # messages on disk
    ready: dict[str, int]  # per channel: jobs waiting in the rq queue
    started: dict[str, int]
    failed: dict[str, int]


def shard_depths(settings: Settings, conn: redis.Redis | None) -> list[ShardDepth]:
    shard_map = ShardMap(settings)
    counts: list[int] = []
    draining: set[int] = set()
    if conn is not None:
        jobs = Jobs(conn, settings.redis_prefix)
        with conn.pipeline(transaction=False) as pipe:
            for shard in shard_map.ids():
                for channel in CHANNELS:
                    queue = jobs.queue(shard, channel)
                    pipe.llen(queue.key)
                    pipe.zcard(StartedJobRegistry(queue=queue).key)
                    pipe.zcard(FailedJobRegistry(queue=queue).key)
            pipe.smembers(shard_map.draining_key)
            *counts, members = pipe.execute()
        draining = {int(m) for m in members}
    rows = []
    for shard in shard_map.ids():
        ready, started, failed = {}, {}, {}
        for c, channel in enumerate(CHANNELS):
            base = (shard * len(CHANNELS) + c) * 3
            ready[channel], started[channel], failed[channel] = counts[base : base + 3] if counts else (0, 0, 0)
        rows.append(ShardDepth(shard, shard in draining, shard_map.spool(shard).count(), ready, started, failed))
    return rows


def render(rows: list[ShardDepth]) -> str:
    head = f"{'shard':>5} {'state':<8} {'spooled':>8} " + " ".join(
        f"{c + ' ' + k:>15}" for c in CHANNELS for k in ("ready", "active", "failed")
    )
    lines = [head]
    for row in rows:
        cells = " ".join(
            f"{n:>15}" for c in CHANNELS for n in (row.ready[c], row.started[c], row.failed[c])
        )
        lines.append(f"{row.shard:>5} {'draining' if row.draining else 'open':<8} {row.spooled:>8} {cells}")
    total = sum(r.spooled for r in rows)
    lines.append(f"{'all':>5} {'':<8} {total:>8}")
    return "\n".join(lines)


def as_json(rows: list[ShardDepth]) -> str:
    return json.dumps([asdict(r) for r in rows], indent=2)
