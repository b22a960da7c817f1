"""The sweep: every queued message has a doorbell in Redis, whatever Redis forgot or a crash lost.

Interface: ``Sweeper(settler)`` with ``sweep(shard, progress=None) -> SweepReport``;
``SweepReport`` (counts, and the corrupt entries moved aside).

For one shard: list the doorbells Redis has (jobs in the rq queue, claims in the started registry
whose lease has not run out, entries in the retry set and the settle list), then read every
committed spool entry. An entry with pending recipients on a channel that has no doorbell is
settled for that channel (scheduled at its computed retry time, or at once when never tried; see
scheduler.retry); one with failed,
unbounced recipients gets its bounce; one that is done (every recipient delivered or bounced) is
removed. An entry younger than ``MIN_AGE`` without a doorbell is looked at again once it is that
old: between a commit and its enqueue (milliseconds apart) its doorbell may be on the way, and the
sweep must not ring a second one (two jobs for one message would deliver it twice).
Leftovers of interrupted writes in tmp/ older than 36 h are removed, and a tmp/ file
beside its committed twin (a replayed rename) at once. An entry that does not decode is moved to
``corrupt/`` and reported, and the sweep goes on. With an empty Redis this rebuilds every queue
from the spool alone (``shardmail recover``), and because retry times are a pure function of
birth and last attempt, the schedule comes back the same.

Failures: Redis errors propagate (the caller retries later); a disk error on one entry is logged
and the sweep goes on.

Settings: none beyond the settler's.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from core.envelope import Channel, id_time, valid_id
from core.spool import LEFTOVER_AGE
from scheduler.retry import Settler

log = logging.getLogger("shardmail.sweep")
SCHEDULE_BATCH = 1000
MIN_AGE = 2.0  # s: an entry this young may be between its commit and its enqueue (ms apart)


@dataclass
class SweepReport:
    entries: int = 0
    scheduled: int = 0
    bounced: int = 0
    removed: int = 0
    with_doorbell: int = 0
    leftovers: int = 0
    corrupt: list[str] = field(default_factory=list)


class Sweeper:
    def __init__(self, settler: Settler) -> None:
        self.settler = settler
        self.jobs = settler.jobs

    def doorbells(self, shard: int) -> set[str]:
        """Every ``<id>:<channel>`` Redis knows for the shard, however it knows it (core.jobs)."""
        return self.jobs.doorbells(shard)

    def sweep(self, shard: int, progress: Callable[[int], None] | None = None) -> SweepReport:
        report = SweepReport()
        spool = self.settler.map.spool(shard)
        known = self.doorbells(shard)
        now = self.settler.clock()
        batch: list[tuple[str, Channel, float]] = []
        settled_before = time.time() - MIN_AGE
        young: list[tuple[str, Channel, float]] = []
        for entry in spool.scan():
            report.entries += 1
            if progress is not None:
                progress(1)
            if entry.envelope is None:
                self._quarantine(spool, entry.id, entry.error, report)
                continue
            envelope = entry.envelope
            missing = [c for c in envelope.channels() if _doorbell(envelope.id, c) not in known]
            if envelope.done() or envelope.unreported():
                outcome = self.settler.settle(shard, envelope.id, missing)
                report.removed += outcome == "removed"
                report.bounced += bool(envelope.unreported())
                report.scheduled += outcome == "scheduled"
                continue
            if not missing:
                report.with_doorbell += 1
                continue
            fresh = valid_id(envelope.id) and id_time(envelope.id) > settled_before
            for channel in missing:  # the common case, batched: one round trip per SCHEDULE_BATCH
                when = self.settler.next_time(envelope, channel, now)
                if when is not None:
                    (young if fresh else batch).append((envelope.id, channel, when))
            report.scheduled += not fresh
            if len(batch) >= SCHEDULE_BATCH:
                self.jobs.schedule(shard, batch)
                batch = []
        if batch:
            self.jobs.schedule(shard, batch)
        if young:  # their doorbells may have been on the way: look again once they had time to ring
            time.sleep(max(0.0, min(MIN_AGE, max(id_time(m) for m, _, _ in young) + MIN_AGE - time.time())))
            known = self.doorbells(shard)
            still = [item for item in young if _doorbell(item[0], item[1]) not in known]
            self.jobs.schedule(shard, still)
            report.scheduled += len({m for m, _, _ in still})
            report.with_doorbell += len({m for m, _, _ in young}) - len({m for m, _, _ in still})
        report.leftovers = self._leftovers(spool)
        return report

    @staticmethod
    def _quarantine(spool: object, message_id: str, error: str, report: SweepReport) -> None:
        try:
            target = spool.quarantine(message_id)  # type: ignore[attr-defined]
        except FileNotFoundError:
            return
        except OSError as exc:
            log.error("corrupt spool entry %s (%s) could not be moved aside: %s", message_id, error, exc)
            return
        log.error("corrupt spool entry %s moved to %s: %s", message_id, target, error)
        report.corrupt.append(message_id)

    @staticmethod
    def _leftovers(spool: object) -> int:
        removed = 0
        for leftover in spool.leftovers():  # type: ignore[attr-defined]
            if leftover.committed or leftover.age > LEFTOVER_AGE:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(leftover.path)
                    removed += 1
        return removed


def _doorbell(message_id: str, channel: str) -> str:
    return f"{message_id}:{channel}"
