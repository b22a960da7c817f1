"""``shardmail qshape``: the queue's shape, domains by age, biggest first (as Postfix's qshape).

Interface: ``shape(settings, shards, which, by, now) -> list[Row]``, ``render(rows, top) -> str``;
``BUCKETS`` (minutes).

Every pending recipient counts once, under its domain (``--by recipient``, the default) or under
its message's sender domain (``--by sender``), in the age bucket of its message (the time since
it arrived): 0-5, 5-10, 10-20 ... 640-1280 and over 1280 minutes, Postfix's buckets. ``ready``
counts recipients never tried yet, ``deferred`` those whose last attempt was deferred, ``all``
both. The first row is the total; then domains by their count, biggest first.

Failures: an entry that cannot be read is skipped (the sweep reports it); nothing here writes.

Settings: ``shards``, ``spool_dir``/``var_dir`` (through core.shards).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from core.address import domain_of
from core.config import Settings
from core.shards import ShardMap

BUCKETS = (5, 10, 20, 40, 80, 160, 320, 640, 1280)  # upper bounds, minutes; the last column is beyond


@dataclass
class Row:
    domain: str
    total: int = 0
    counts: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))

    def add(self, bucket: int) -> None:
        self.total += 1
        self.counts[bucket] += 1


def bucket(age_minutes: float) -> int:
    for index, bound in enumerate(BUCKETS):
        if age_minutes < bound:
            return index
    return len(BUCKETS)


def shape(settings: Settings, shards: Iterable[int], which: str, by: str, now: float) -> list[Row]:
    shard_map = ShardMap(settings)
    total = Row("TOTAL")
    rows: dict[str, Row] = {}
    for shard in shards:
        for entry in shard_map.spool(shard).scan():
            envelope = entry.envelope
            if envelope is None:
                continue
            age = bucket(max(0.0, now - envelope.birth) / 60)
            states = envelope.states()
            for index in envelope.pending():
                mark = states[index]
                ready = mark is None or mark.state == "pending"
                if (which == "ready" and not ready) or (which == "deferred" and ready):
                    continue
                address = envelope.sender if by == "sender" else envelope.recipients[index].address
                domain = (domain_of(address) or ("<>" if not address else "(local)")).lower()
                rows.setdefault(domain, Row(domain)).add(age)
                total.add(age)
    return [total, *sorted(rows.values(), key=lambda r: (-r.total, r.domain))]


def render(rows: list[Row], top: int = 0) -> str:
    shown = rows if not top else rows[: top + 1]
    width = max(len(r.domain) for r in shown)
    head = " " * width + f" {'T':>6}" + "".join(f" {b:>6}" for b in BUCKETS) + f" {str(BUCKETS[-1]) + '+':>6}"
    lines = [head]
    for row in shown:
        lines.append(f"{row.domain:>{width}} {row.total:>6}" + "".join(f" {c:>6}" for c in row.counts))
    return "\n".join(lines)
