"""Queue depth per shard and channel: the first view an operator wants (``shardmail status``).

Interface: ``Census`` (spool figures, remembered between calls), ``gather(settings, conn, census,
now) -> Status``, ``compose(space, conn, shards, disk, draining, listed_at, now) -> Status`` (any
node's, from spool figures given: ops.cluster passes those of a node's heartbeat),
``render(status) -> str``, ``as_dict(status)`` / ``as_json(status)`` (field names
below are stable; ``version`` changes if one ever does).

Redis figures come from one pipelined round trip for every shard (core.jobs' ``census``): rq's
queue lists (ready), started registries (in flight) and failed registries, the retry set
(deferred, and how many of those are due), the settle list, the per-minute tallies core.jobs keeps
(rates over the last minute: this minute's count plus the last minute's weighted by the part of it
still inside the window) and rq's worker registry (the live workers with their queues). Spool figures come
from directory listings only, never from reading a file (core.spool's ``census``): the spooled
count, held mail, and the oldest message. A split directory whose mtime has not moved since a
listing that began well after it is not listed again.

JSON fields: ``version``, ``time``, ``redis`` (false: Redis unreachable, its figures are 0),
``spool_age`` (s since the spool was listed), ``shards``: [{``shard``, ``state`` (open|draining|paused,
the last while a rebalance has it), ``draining``, ``spooled``, ``held``, ``oldest_age`` (s or null),
``deferred``, ``due``, ``settling``, ``channels``: {local|remote: {``ready``, ``in_flight``, ``failed``,
``workers``, ``in_per_s``, ``out_per_s``, ``head_age`` (s since the message at the head of the ready
queue arrived, or null)}}],
``total`` (the same sums, no ``shard``/``state``; ``workers`` counts each worker once), ``pools``:
[{``pool``, ``channel``, ``workers``, ``names``, ``shards``}].

Failures: Redis down raises ``redis.RedisError`` from ``gather``; the CLI then shows the spool alone
(``gather(..., conn=None)``). A shard directory that vanishes counts 0.
Settings: ``shards``, ``redis_prefix``, ``spool_dir``/``var_dir``, ``queue_split``.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field

import redis

from core.config import Settings
from core.envelope import CHANNELS, Channel, id_time
from core.jobs import Jobs, QueueFigures, ShardFigures, WorkerRecord
from core.shards import Namespace, ShardMap
from core.spool import Counts, Listings

VERSION = 1
_SLOT = re.compile(r"([.-]\d+)+$")  # a pool's slot or process number: mx.local-0 and mx.local-1.2 are "mx.local"

@dataclass(frozen=True, slots=True)
class ChannelDepth:
    ready: int = 0
    in_flight: int = 0
    failed: int = 0
    workers: int = 0
    in_per_s: float = 0.0
    out_per_s: float = 0.0
    head_age: float | None = None


@dataclass(frozen=True, slots=True)
class ShardDepth:
    shard: int
    state: str
    draining: bool
    spooled: int
    held: int
    oldest_age: float | None
    deferred: int
    due: int
    settling: int
    channels: dict[Channel, ChannelDepth]


@dataclass(frozen=True, slots=True)
class Pool:
    pool: str
    channel: str
    workers: int
    names: list[str]
    shards: list[int]


@dataclass(frozen=True, slots=True)
class Status:
    time: float
    redis: bool
    spool_age: float
    shards: list[ShardDepth]
    pools: list[Pool] = field(default_factory=list)


class Census:
    """Spool figures per shard (core.spool's ``census``), remembering the directory listings between
    calls (``Listings``), so a refresh of an idle queue costs a stat per directory."""

    def __init__(self) -> None:
        self._listings = Listings()
        self.listed_at = 0.0
        self.cost = 0.0  # CPU seconds the last ``take`` spent
        self.last: dict[int, Counts] = {}

    def take(self, shard_map: ShardMap, shards: list[int]) -> dict[int, Counts]:
        """Per shard: its entries, held entries and oldest id."""
        cpu = time.process_time()
        result = {shard: shard_map.spool(shard).census(self._listings) for shard in shards}
        self.listed_at = time.time()
        self.cost = time.process_time() - cpu
        self.last = result
        return result


def _rate(current: int, previous: int, now: float) -> float:
    """Jobs per second over the last 60 s, from two per-minute counters: all of this minute's, and
    the share of the last minute still inside the window."""
    inside = 1.0 - (now % 60) / 60
    return (current + previous * inside) / 60


def _pool_name(name: str) -> str:
    return _SLOT.sub("", name) or name


def gather(settings: Settings, conn: redis.Redis | None, census: Census | None = None, now: float | None = None,
           spool: bool = True) -> Status:
    """Every figure, in one Redis round trip (core.jobs' ``census``) and the spool listings
    (``spool=False``: the census's last figures, for a watcher keeping its listing cost down)."""
    now = time.time() if now is None else now
    census = census or Census()
    shard_map = ShardMap(settings)
    shards = list(shard_map.ids())
    disk = census.take(shard_map, shards) if spool or not census.listed_at else census.last
    return compose(Namespace.of(settings), conn, shards, disk, shard_map.draining(), census.listed_at, now)


def compose(space: Namespace, conn: redis.Redis | None, shards: list[int], disk: dict[int, Counts],
            draining: set[int], listed_at: float, now: float) -> Status:
    """One node's status from its spool figures (listed here, or carried by its heartbeat) and
    what Redis holds for its namespace (none without ``conn``)."""
    figures: dict[int, ShardFigures] = {}
    workers: list[WorkerRecord] = []
    if conn is not None:
        figures, workers = Jobs(conn, space).census(shards, now)
    pools, workers_on = _pools(workers)
    rows = []
    for shard in shards:
        counts = disk.get(shard) or Counts(0, 0, None)
        found = figures.get(shard) or ShardFigures({channel: QueueFigures() for channel in CHANNELS})
        channels = {}
        for channel in CHANNELS:
            queue = found.channels[channel]
            channels[channel] = ChannelDepth(
                queue.ready, queue.in_flight, queue.failed, workers_on.get((shard, channel), 0),
                _rate(*queue.entered, now), _rate(*queue.left, now),
                _age(queue.head, now) if queue.head else None)
        state = "paused" if found.paused else "draining" if shard in draining else "open"
        rows.append(ShardDepth(shard, state, shard in draining, counts.spooled, counts.held,
                               _age(counts.oldest, now) if counts.oldest else None, found.deferred, found.due,
                               found.settling, channels))
    return Status(now, conn is not None, max(0.0, now - listed_at), rows, pools)


def _age(message_id: str, now: float) -> float | None:
    try:
        return max(0.0, now - id_time(message_id))
    except ValueError:
        return None


def _pools(workers: list[WorkerRecord]) -> tuple[list[Pool], dict[tuple[int, str], int]]:
    """Live rq workers serving this deployment's queues, by pool; and workers per (shard, channel)."""
    by_pool: dict[tuple[str, str], tuple[list[str], set[int]]] = {}
    per_queue: dict[tuple[int, str], int] = {}
    for worker in workers:
        for shard, channel in worker.queues:
            per_queue[shard, channel] = per_queue.get((shard, channel), 0) + 1
        channel = worker.queues[0][1]
        names, shards = by_pool.setdefault((_pool_name(worker.name), channel), ([], set()))
        names.append(worker.name)
        shards.update(s for s, _ in worker.queues)
    pools = [Pool(pool, channel, len(names), sorted(names), sorted(shards))
             for (pool, channel), (names, shards) in sorted(by_pool.items())]
    return pools, per_queue


def _sum_channels(status: Status) -> dict[Channel, ChannelDepth]:
    """Per channel over every shard; ``workers`` counts each worker once (not once per shard it serves)."""
    total: dict[Channel, ChannelDepth] = {}
    for channel in CHANNELS:
        parts = [r.channels[channel] for r in status.shards]
        heads = [p.head_age for p in parts if p.head_age is not None]
        workers = sum(p.workers for p in status.pools if p.channel == channel)
        total[channel] = ChannelDepth(sum(p.ready for p in parts), sum(p.in_flight for p in parts),
                                      sum(p.failed for p in parts), workers,
                                      sum(p.in_per_s for p in parts), sum(p.out_per_s for p in parts),
                                      max(heads) if heads else None)
    return total


def as_dict(status: Status) -> dict:
    ages = [r.oldest_age for r in status.shards if r.oldest_age is not None]
    total = {key: sum(getattr(r, key) for r in status.shards)
             for key in ("spooled", "held", "deferred", "due", "settling")}
    total["oldest_age"] = max(ages) if ages else None
    total["channels"] = {c: asdict(d) for c, d in _sum_channels(status).items()}
    return {"version": VERSION, "time": status.time, "redis": status.redis, "spool_age": status.spool_age,
            "shards": [asdict(r) for r in status.shards], "total": total,
            "pools": [asdict(p) for p in status.pools]}


def as_json(status: Status, indent: int | None = 2) -> str:
    return json.dumps(as_dict(status), indent=indent)


def age_text(seconds: float | None) -> str:
    """3s, 4m05s, 2h07m, 3d04h: an age in the two largest units."""
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


COLUMNS = ("shard", "state", "channel", "ready", "in-flight", "failed", "workers", "in/s", "out/s", "head",
           "spooled", "held", "deferred", "due", "oldest")


def render(status: Status) -> str:
    """One line per shard and channel (the shard's spool and retry figures on its first line), a
    total per channel, then the pools."""
    table: list[tuple[str, ...]] = [COLUMNS]

    def line(shard: str, state: str, channel: str, d: ChannelDepth, tail: tuple[str, ...]) -> tuple[str, ...]:
        return (shard, state, channel, str(d.ready), str(d.in_flight), str(d.failed), str(d.workers),
                f"{d.in_per_s:.1f}", f"{d.out_per_s:.1f}", age_text(d.head_age), *tail)

    for row in status.shards:
        for c, channel in enumerate(CHANNELS):
            tail = (str(row.spooled), str(row.held), str(row.deferred), str(row.due),
                    age_text(row.oldest_age)) if c == 0 else ("",) * 5
            table.append(line(str(row.shard) if c == 0 else "", row.state if c == 0 else "", channel,
                              row.channels[channel], tail))
    totals = as_dict(status)["total"]
    for c, (total_channel, d) in enumerate(_sum_channels(status).items()):
        tail = (str(totals["spooled"]), str(totals["held"]), str(totals["deferred"]), str(totals["due"]),
                age_text(totals["oldest_age"])) if c == 0 else ("",) * 5
        table.append(line("all" if c == 0 else "", "", total_channel, d, tail))
    widths = [max(len(r[i]) for r in table) for i in range(len(COLUMNS))]
    left = {1, 2}  # state and channel read left to right; numbers line up on the right
    lines = [" ".join(cell.ljust(w) if i in left else cell.rjust(w)
                      for i, (cell, w) in enumerate(zip(r, widths, strict=True))).rstrip() for r in table]
    if not status.redis:
        lines.append("(Redis unavailable: queue figures are missing, spool figures only)")
    lines.append("")
    if status.pools:
        width = max(len(p.pool) for p in status.pools)
        lines.append(f"{'pool':<{width}} channel workers shards")
        for p in status.pools:
            lines.append(f"{p.pool:<{width}} {p.channel:<7} {p.workers:>7} {_ranges(p.shards)}")
    else:
        lines.append("no workers registered")
    return "\n".join(lines)


def _ranges(shards: list[int]) -> str:
    """0-3,5: the shards a pool serves, as the --shards option writes them."""
    parts: list[str] = []
    for shard in shards:
        if parts and shard == int(parts[-1].rpartition("-")[2]) + 1:
            parts[-1] = f"{parts[-1].partition('-')[0]}-{shard}"
        else:
            parts.append(str(shard))
    return ",".join(parts)
