"""``shardmail recover``: rebuild every queue in Redis from the spool, on demand.

Interface: ``recover(settings, out=sys.stderr) -> int`` (exit status).

After Redis lost its data (a restart without persistence, a flush, a new instance), every
committed message is still in the spool. This sweeps each shard (scheduler.sweep; a process per
core, shards shared out among them) with a progress bar: a message with no doorbell left gets a
retry-set entry at its computed time (at once for recipients never tried), failed recipients get
their bounces, finished entries are removed, corrupt ones moved aside. The running scheduler then
moves due entries into the rq queues in windows of ``releasewindow`` jobs. Safe to run at any time,
also while everything runs: a message that still has its job keeps just that one.

Failures: Redis unavailable → exit 75 (EX_TEMPFAIL) before anything changed.

Settings: those of scheduler.retry and core.shards.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, wait
from multiprocessing.sharedctypes import Synchronized
from typing import TextIO

import redis

from core.config import Settings
from core.outcome import EX_OK, EX_TEMPFAIL
from core.redis_conn import connect
from core.submit import Submitter
from scheduler.retry import Settler
from scheduler.sweep import Sweeper, SweepReport

BAR = 30
PROGRESS_STEP = 500  # entries a worker reads between two progress reports


class Progress:
    """A one-line progress bar on a terminal (plain lines elsewhere, every 10 %)."""

    def __init__(self, total: int, out: TextIO, label: str = "recover") -> None:
        self.label = label
        self.total = max(total, 1)
        self.done = 0
        self.out = out
        self.started = time.monotonic()
        self.tty = out.isatty()
        self._shown = -1

    def __call__(self, count: int) -> None:
        self.done += count
        tenth = self.done * 10 // self.total
        if self.tty:
            filled = self.done * BAR // self.total
            rate = self.done / max(time.monotonic() - self.started, 1e-6)
            self.out.write(f"\r[{'#' * filled}{'.' * (BAR - filled)}] {self.done}/{self.total} {rate:,.0f} msg/s")
            self.out.flush()
        elif not self.tty and tenth != self._shown:
            self._shown = tenth
            self.out.write(f"{self.label}: {self.done}/{self.total} messages\n")

    def close(self) -> None:
        if self.tty:
            self.out.write("\n")


_counter: Synchronized | None = None  # in a worker process: where it counts what it read


def _start_worker(counter: Synchronized) -> None:
    global _counter
    _counter = counter


def _sweep_shard(settings: Settings, shard: int) -> SweepReport:
    """In a worker process: one shard, with its own Redis connection."""
    conn = connect(settings)
    sweeper = Sweeper(Settler(settings, conn, Submitter(settings, conn)))
    seen = [0]

    def count(n: int) -> None:
        seen[0] += n
        if seen[0] >= PROGRESS_STEP and _counter is not None:
            with _counter.get_lock():
                _counter.value += seen[0]
            seen[0] = 0

    report = sweeper.sweep(shard, count)
    if _counter is not None:
        with _counter.get_lock():
            _counter.value += seen[0]
    return report


def recover(settings: Settings, out: TextIO = sys.stderr) -> int:
    """Sweep every shard, one process per core working through them (reading and parsing the
    spool is the cost, and it divides), with one progress bar."""
    conn = connect(settings)
    try:
        conn.ping()
    except redis.RedisError as exc:
        print(f"shardmail recover: Redis unavailable ({exc}); nothing changed", file=out)
        return EX_TEMPFAIL
    shard_map = Submitter(settings, conn).map
    total = sum(shard_map.spool(s).count() for s in shard_map.ids())
    progress = Progress(total, out)
    started = time.monotonic()
    counter = multiprocessing.get_context("fork").Value("q", 0)
    workers = min(os.cpu_count() or 1, settings.shards)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"), initializer=_start_worker,
                             initargs=(counter,)) as pool:
        futures = [pool.submit(_sweep_shard, settings, shard) for shard in shard_map.ids()]
        shown = 0
        while not all(f.done() for f in futures):
            wait(futures, timeout=0.2)
            if counter.value > shown:
                progress(counter.value - shown)
                shown = counter.value
        if counter.value > shown:
            progress(counter.value - shown)
        reports: list[SweepReport] = [f.result() for f in futures]
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
