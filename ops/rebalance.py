"""``shardmail shards rebalance``: move queued messages, with their doorbells, from one shard to others.

Interface: ``Rebalancer(settings, conn, name=None)`` with ``run(source, targets, count=None,
progress=None) -> RebalanceReport``; ``ShardBusy`` (another rebalancer has the shard).

How, so that a SIGKILL at any point loses nothing and duplicates nothing:

1. **The source shard to ourselves.** The shard's pause key is set (with an expiry, renewed as we go,
   so a dead rebalancer frees the shard by itself): consumers claim nothing more from it, and its
   scheduler gives up its lease, which we then take (so no settle, release or sweep runs there
   meanwhile). Messages whose jobs were already claimed (an unexpired claim in the started
   registry) are left where they are, as are messages younger than ``MIN_AGE`` (their enqueue may be
   under way) and messages waiting for their bounce (the scheduler finishes those first).
2. **Per batch, to one target shard:** a journal entry per message (``<prefix>:rebalance:journal``,
   id -> ``source>target``) and a *provisional* doorbell in the target's retry set, ``GRACE``
   seconds ahead; then each file is renamed into the target's spool (atomic: at every instant a
   message lies in exactly one shard) and the directories are made durable; then the real doorbell
   (its computed retry time: at once when never tried, qmail's schedule when deferred) replaces the
   provisional one, the source's retry entries go, and the journal entries are deleted.
3. **At the end:** the source's queued jobs for messages no longer there are taken out of its rq
   queues, the lease and the pause key are given back; the scheduler, taking the lease afresh,
   sweeps the source shard.

A crash leaves each message in one shard, with a doorbell: still in the source (its own jobs are
still queued there; a lapsed pause lets them run), or in the target with the provisional doorbell
(it rings after ``GRACE`` seconds; a rebalancer run again replays the journal and rings it at once).
A provisional doorbell for a file that did not move finds nothing in the target and is dropped. Stale
jobs left in the source for moved messages find no file and are dropped too (and the next run takes
them out). Nothing is ever in two shards, so nothing is delivered twice.

Failures: Redis errors and disk errors propagate (the CLI reports them; everything done so far is
consistent, and running again continues). Settings: those of core.shards.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import redis

from core import faults
from core.backoff import next_time
from core.config import Settings
from core.envelope import CHANNELS, Envelope, id_time, valid_id
from core.jobs import Jobs
from core.lease import LEASE_MS, acquire, lease_key
from core.redis_conn import text
from core.shards import Namespace, ShardMap

log = logging.getLogger("shardmail.rebalance")
BATCH = 500
GRACE = 60.0  # s before a provisional doorbell rings (the rename it waits for takes milliseconds)
PAUSE_MS = 30_000
MIN_AGE = 2.0  # s: as the sweep's, a younger entry may still be waiting for its enqueue
WAIT_LEASE = LEASE_MS / 1000 + 10  # s to wait for the scheduler to hand the source shard over

_TAKE = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] and holder ~= ARGV[3] then return holder end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false
"""
_KEEP = """
for i, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then redis.call('PEXPIRE', key, ARGV[2]) end
end
return 0
"""
_GIVE_BACK = """
for i, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then redis.call('DEL', key) end
end
return 0
"""
class ShardBusy(Exception):
    """Another rebalancer holds the shard, or its scheduler would not hand it over."""


@dataclass
class RebalanceReport:
    moved: dict[int, int] = field(default_factory=dict)  # target shard -> messages moved there
    in_flight: int = 0  # left in the source: a delivery of theirs was under way
    young: int = 0  # left: younger than MIN_AGE
    settling: int = 0  # left: waiting for their bounce or removal by the scheduler
    unreadable: int = 0  # left for the sweep
    replayed: int = 0  # journal entries of an interrupted earlier run, completed
    stale_jobs: int = 0  # source jobs of messages no longer there, taken out
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return sum(self.moved.values())


class Rebalancer:
    def __init__(self, settings: Settings, conn: redis.Redis, name: str | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.conn = conn
        self.map = ShardMap(settings)
        self.jobs = Jobs(conn, Namespace.of(settings))
        self.next_time = next_time
        self.clock = clock
        self.name = name or f"{socket.gethostname()}.{os.getpid()}.rebalance"
        self.journal = Namespace.of(settings).shared(f"rebalance:journal:{settings.node}")
        self._take = conn.register_script(_TAKE)
        self._keep = conn.register_script(_KEEP)
        self._give_back = conn.register_script(_GIVE_BACK)
        self._kept = 0.0

    # -- the source shard to ourselves -----------------------------------------------------------
    def _keys(self, shard: int) -> list[str]:
        return [self.map.pause_key(shard), lease_key(self.jobs.space, shard)]

    def _hold(self, shard: int) -> None:
        pause, lease = self._keys(shard)
        holder = self._take(keys=[pause], args=[self.name, PAUSE_MS, ""])
        if holder and _dead_here(holder.decode()):  # a rebalancer killed on this host: take over at once
            previous = holder.decode()
            holder = self._take(keys=[pause], args=[self.name, PAUSE_MS, previous])
            if not holder:
                self._give_back(keys=[lease], args=[previous])
                log.warning("took shard %d over from %s, which died mid-run", shard, previous)
        if holder:
            raise ShardBusy(f"shard {shard} is being rebalanced by {holder.decode()}")
        if not acquire(self.conn, self.jobs.space, shard, self.name, WAIT_LEASE):
            self._release(shard)
            raise ShardBusy(f"the scheduler leading shard {shard} did not hand it over within {WAIT_LEASE:.0f} s")
        self._kept = time.monotonic()

    def _keep_holding(self, shard: int) -> None:
        if time.monotonic() - self._kept > 2.0:
            self._keep(keys=self._keys(shard), args=[self.name, PAUSE_MS])
            self._kept = time.monotonic()

    def _release(self, shard: int) -> None:
        """The pause and the scheduler lease back; the shard's idle pools are woken for what stayed
        queued in it (they would otherwise find it within their wake-up timeout)."""
        self._give_back(keys=self._keys(shard), args=[self.name])
        self.jobs.wake([(shard, channel) for channel in CHANNELS])

    def _in_flight(self, shard: int) -> set[str]:
        """Messages with an unexpired claim on the shard (being delivered right now)."""
        return self.jobs.in_flight([shard])

    # -- moving ----------------------------------------------------------------------------------
    def run(self, source: int, targets: list[int], count: int | None = None,
            progress: Callable[[int], None] | None = None) -> RebalanceReport:
        started = time.monotonic()
        shards = self.map.ids(fresh=True)
        for shard in (source, *targets):
            if shard not in shards:
                raise KeyError(f"no such shard: {shard}")
        if not targets or source in targets:
            raise ValueError("the targets must be other shards than the source")
        report = RebalanceReport(moved={t: 0 for t in targets})
        self._hold(source)
        try:
            report.replayed = self._replay()
            busy = self._in_flight(source)
            settled_before = time.time() - MIN_AGE
            batches: dict[int, list[Envelope]] = {t: [] for t in targets}
            turn = 0
            for entry in self.map.spool(source).scan():
                if count is not None and report.total + sum(map(len, batches.values())) >= count:
                    break
                self._keep_holding(source)
                envelope = entry.envelope
                if envelope is None:
                    report.unreadable += 1
                elif envelope.id in busy:
                    report.in_flight += 1
                elif envelope.done() or envelope.unreported() or not envelope.channels():
                    report.settling += 1
                elif not valid_id(envelope.id) or id_time(envelope.id) > settled_before:
                    report.young += 1
                else:
                    target = targets[turn % len(targets)]
                    turn += 1
                    batches[target].append(envelope)
                    if len(batches[target]) >= BATCH:
                        report.moved[target] += self._move(source, target, batches[target], progress)
                        batches[target] = []
            for target, batch in batches.items():
                if batch:
                    report.moved[target] += self._move(source, target, batch, progress)
            report.stale_jobs = self._drop_stale(source)
        finally:
            self._release(source)
        report.seconds = time.monotonic() - started
        log.info("moved %d messages from shard %d to %s in %.1f s; left %d in flight, %d young, %d settling",
                 report.total, source, report.moved, report.seconds, report.in_flight, report.young, report.settling)
        return report

    def _move(self, source: int, target: int, batch: list[Envelope],
              progress: Callable[[int], None] | None) -> int:
        retry_target = self.jobs.retry_key(target)
        now = self.clock()
        with self.conn.pipeline(transaction=False) as pipe:
            for envelope in batch:
                pipe.hset(self.journal, envelope.id, f"{source}>{target}")
                for channel in envelope.channels():
                    pipe.zadd(retry_target, {f"{envelope.id}:{channel}": now + GRACE})
            pipe.execute()
        faults.crash_point("rebalance_after_journal")
        moved = set(self.map.spool(source).move_to(self.map.spool(target), [e.id for e in batch]))
        faults.crash_point("rebalance_after_move")
        self._ring(source, target, [e for e in batch if e.id in moved], now)
        with self.conn.pipeline(transaction=False) as pipe:  # those that vanished meanwhile
            for envelope in batch:
                if envelope.id not in moved:
                    pipe.hdel(self.journal, envelope.id)
                    pipe.zrem(retry_target, *(f"{envelope.id}:{c}" for c in CHANNELS))
            pipe.execute()
        if progress is not None:
            progress(len(batch))
        return len(moved)

    def _ring(self, source: int, target: int, envelopes: Iterable[Envelope], now: float) -> None:
        """The real doorbells of messages now in ``target``; the source's and the journal's go."""
        with self.conn.pipeline(transaction=False) as pipe:
            for envelope in envelopes:
                for channel in envelope.channels():
                    when = self.next_time(envelope, channel, now)
                    if when is not None:
                        pipe.zadd(self.jobs.retry_key(target), {f"{envelope.id}:{channel}": when})
                pipe.zrem(self.jobs.retry_key(source), *(f"{envelope.id}:{c}" for c in CHANNELS))
                pipe.hdel(self.journal, envelope.id)
            pipe.execute()

    def _replay(self) -> int:
        """Finish what an interrupted run left in the journal."""
        entries = {text(k): text(v) for k, v in self.conn.hgetall(self.journal).items()}
        done = 0
        for message_id, route in entries.items():
            source_text, _, target_text = route.partition(">")
            source, target = int(source_text), int(target_text)
            try:
                envelope = self.map.spool(target).read(message_id)
            except FileNotFoundError:  # still in the source (moved again below), or delivered since
                self.conn.hdel(self.journal, message_id)
                continue
            except (OSError, ValueError) as exc:
                log.error("journal entry %s: unreadable in shard %d (%s); left for the sweep", message_id, target, exc)
                self.conn.hdel(self.journal, message_id)
                continue
            self._ring(source, target, [envelope], self.clock())
            done += 1
        return done

    def _drop_stale(self, source: int) -> int:
        """Take out of the source's queues the jobs of messages that are no longer there."""
        spool = self.map.spool(source)
        removed = 0
        for channel in CHANNELS:
            stale = [m for m in self.jobs.queued(source, channel) if spool.where(m) != "queue"]
            removed += self.jobs.drop_queued(source, channel, stale)
        return removed


def _dead_here(holder: str) -> bool:
    """Whether a holder's name (``<host>.<pid>.rebalance``) is a process of this host that is gone."""
    host, _, rest = holder.rpartition(".rebalance")[0].rpartition(".")
    if host != socket.gethostname() or not rest.isdigit():
        return False
    try:
        os.kill(int(rest), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
