"""``shardmail recover``: rebuild every queue in Redis from the spool, on demand.

Interface: ``recover(settings, out=sys.stderr) -> int`` (exit status).

After Redis lost its data (a restart without persistence, a flush, a new instance), every
committed message is still in the spool. This sweeps each shard (scheduler.sweep) with a progress
bar: a message with no doorbell left gets a retry-set entry at its computed time (at once for
recipients never tried), failed recipients get their bounces, finished entries are removed,
corrupt ones moved aside. The running scheduler then moves due entries into the rq queues in
windows of ``releasewindow`` jobs. Safe to run at any time, also while everything runs: a message
that still has its job keeps just that one.

Failures: Redis unavailable → exit 75 (EX_TEMPFAIL) before anything changed.

Settings: those of scheduler.retry and core.shards.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

import redis

from core.config import Settings
from core.outcome import EX_OK, EX_TEMPFAIL
from core.redis_conn import connect
from core.submit import Submitter
from scheduler.retry import Settler
from scheduler.sweep import Sweeper, SweepReport

BAR = 30


class Progress:
    """A one-line progress bar on a terminal (plain lines elsewhere, every 10 %)."""

    def __init__(self, total: int, out: TextIO) -> None:
        self.total = max(total, 1)
        self.done = 0
        self.out = out
        self.started = time.monotonic()
        self.tty = out.isatty()
        self._shown = -1

    def __call__(self, count: int) -> None:
        self.done += count
        tenth = self.done * 10 // self.total
        if self.tty and (self.done % 500 == 0 or self.done == self.total):
            filled = self.done * BAR // self.total
            rate = self.done / max(time.monotonic() - self.started, 1e-6)
            self.out.write(f"\r[{'#' * filled}{'.' * (BAR - filled)}] {self.done}/{self.total} {rate:,.0f} msg/s")
            self.out.flush()
        elif not self.tty and tenth != self._shown:
            self._shown = tenth
            self.out.write(f"recover: {self.done}/{self.total} messages\n")

    def close(self) -> None:
        if self.tty:
            self.out.write("\n")


def recover(settings: Settings, out: TextIO = sys.stderr) -> int:
    conn = connect(settings)
    try:
        conn.ping()
    except redis.RedisError as exc:
        print(f"shardmail recover: Redis unavailable ({exc}); nothing changed", file=out)
        return EX_TEMPFAIL
    submitter = Submitter(settings, conn)
    sweeper = Sweeper(Settler(settings, conn, submitter))
    total = sum(submitter.map.spool(s).count() for s in submitter.map.ids())
    progress = Progress(total, out)
    started = time.monotonic()
    reports: list[SweepReport] = [sweeper.sweep(shard, progress) for shard in submitter.map.ids()]
    progress.close()
    seconds = time.monotonic() - started
    entries = sum(r.entries for r in reports)
    print(f"recover: {entries} messages in {len(reports)} shards read in {seconds:.1f} s "
          f"({entries / max(seconds, 1e-6):,.0f} msg/s): {sum(r.scheduled for r in reports)} queued again, "
          f"{sum(r.with_doorbell for r in reports)} already queued, {sum(r.bounced for r in reports)} bounced, "
          f"{sum(r.removed for r in reports)} finished and removed, {sum(r.leftovers for r in reports)} "
          f"leftovers removed, {sum(len(r.corrupt) for r in reports)} corrupt moved aside", file=out)
    for report in reports:
        for message_id in report.corrupt:
            print(f"recover: corrupt entry {message_id} moved to corrupt/", file=out)
    return EX_OK
