"""``shardmail qshape``: the queue's shape, domains by age, biggest first (as Postfix's qshape).

Interface: ``shape(settings, shards, which, by, now) -> list[Row]``, ``render(rows, top) -> str``;
``BUCKETS`` (minutes).

Every pending recipient counts once, under its domain (``--by recipient``, the default) or under
its message's sender domain (``--by sender``), in the age bucket of its message (the time since
it arrived): 0-5, 5-10, 10-20 ... 640-1280 and over 1280 minutes, Postfix's buckets. ``ready``
counts recipients never tried yet, ``deferred`` those whose last attempt was deferred, ``all``
both. The first row is the total; then domains by their count, biggest first. ``--json`` prints
``{which, by, rows: [{domain, total, counts}]}`` (counts per bucket, the last beyond them all);
``--cluster`` gathers every node's (ops.cluster_spool).

Fast on big queues (a million messages in a few seconds): an entry is read only as far as its
envelope line and its marks (core.spool's ``heads``: the body is never read), and the spool's
split directories (``Spool.queue_dirs``) are shared out among ``PER_CORE`` processes per core,
whose counts are merged.

Failures: an entry that cannot be read is skipped (the sweep reports it); nothing here writes.

Settings: ``shards``, ``spool_dir``/``var_dir`` (through core.shards).
"""

from __future__ import annotations

import multiprocessing
import os
from bisect import bisect_right
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

from core.config import Settings
from core.envelope import decode_marks
from core.shards import ShardMap
from core.spool import heads

BUCKETS = (5, 10, 20, 40, 80, 160, 320, 640, 1280)  # upper bounds, minutes; the last column is beyond
# Processes per core: an entry whose page is not cached waits for the disk, and the others use the CPU
# meanwhile (50,000 entries out of the page cache here: 5.5 s with one process per core, 2.1-2.7 s
# with four; cached, the same 0.5 s either way).
PER_CORE = 4


@dataclass
class Row:
    domain: str
    total: int = 0
    counts: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))

    def add(self, bucket: int, count: int = 1) -> None:
        self.total += count
        self.counts[bucket] += count


def bucket(age_minutes: float) -> int:
    """The column of an age: the first bound it is under, or the last column (beyond them all)."""
    return bisect_right(BUCKETS, age_minutes)


def _domain(address: str) -> str:
    """As core.address.domain_of, with qshape's names for the null sender and bare local parts."""
    if "@" not in address:
        return "<>" if not address else "(local)"
    return address.rpartition("@")[2].rstrip(".").lower() or "(local)"


Tally = list[dict[str, int]]  # per age bucket: domain -> pending recipients


def _shape_dir(directory: str, which: str, by: str, now: float) -> Tally:
    """The counts of one split directory. The per-message path is kept lean (a million entries
    pass through it): per-bucket dicts instead of (domain, bucket) keys, a cache of host parts
    already normalised, marks decoded only where there are any."""
    tally: Tally = [{} for _ in range(len(BUCKETS) + 1)]
    hosts: dict[str, str] = {}
    want_ready, want_deferred, by_sender = which != "deferred", which != "ready", by == "sender"
    for doc, blob in heads(directory):
        if not blob and not want_ready:
            continue  # never tried: nothing deferred here
        try:
            counts = tally[bisect_right(BUCKETS, max(0.0, now - float(doc["birth"])) / 60)]
            recipients = doc["rcpt"]
            if blob:
                states = {mark.index: mark.state for mark in decode_marks(blob)}
                wanted = []
                for index, pair in enumerate(recipients):
                    state = states.get(index)
                    if state is None or state == "pending":
                        if want_ready:
                            wanted.append(pair)
                    elif state == "deferred" and want_deferred:
                        wanted.append(pair)  # final states (delivered, failed, bounced) never count
                recipients = wanted
            if by_sender:
                if recipients:
                    sender = _domain(str(doc["sender"]))
                    counts[sender] = counts.get(sender, 0) + len(recipients)
                continue
            for address, _channel in recipients:
                _, at, host = address.rpartition("@")
                if not at:
                    domain = "<>" if not address else "(local)"
                else:
                    domain = hosts.get(host) or hosts.setdefault(host, host.rstrip(".").lower() or "(local)")
                counts[domain] = counts.get(domain, 0) + 1
        except (ValueError, KeyError, TypeError, AttributeError, IndexError):
            continue
    return tally


def _shape_dir_args(args: tuple[str, str, str, float]) -> Tally:
    return _shape_dir(*args)


def shape(settings: Settings, shards: Iterable[int], which: str, by: str, now: float,
          processes: int | None = None, start: str = "fork") -> list[Row]:
    """Read every split directory of the shards, ``processes`` (default ``PER_CORE`` a core) sharing
    them out, reading only envelopes and marks; merge the counts. ``start``: how the processes
    start (multiprocessing's start method: ``forkserver`` from a process with threads, which
    must not fork)."""
    shard_map = ShardMap(settings)
    units = [(directory, which, by, now) for shard in shards for directory in shard_map.spool(shard).queue_dirs()]
    processes = processes or PER_CORE * (os.cpu_count() or 1)
    total = Row("TOTAL")
    rows: dict[str, Row] = {}

    def merge(tally: Tally) -> None:
        for age, counts in enumerate(tally):
            for domain, count in counts.items():
                row = rows.get(domain)
                if row is None:
                    row = rows[domain] = Row(domain)
                row.add(age, count)
                total.add(age, count)

    if processes <= 1 or len(units) <= 1:
        for unit in units:
            merge(_shape_dir(*unit))
    else:
        with ProcessPoolExecutor(min(processes, len(units)), mp_context=multiprocessing.get_context(start)) as pool:
            for tally in pool.map(_shape_dir_args, units):
                merge(tally)
    return [total, *sorted(rows.values(), key=lambda r: (-r.total, r.domain))]


def render(rows: list[Row], top: int = 0) -> str:
    shown = rows if not top else rows[: top + 1]
    width = max(len(r.domain) for r in shown)
    head = " " * width + f" {'T':>6}" + "".join(f" {b:>6}" for b in BUCKETS) + f" {str(BUCKETS[-1]) + '+':>6}"
    lines = [head]
    for row in shown:
        lines.append(f"{row.domain:>{width}} {row.total:>6}" + "".join(f" {c:>6}" for c in row.counts))
    return "\n".join(lines)
