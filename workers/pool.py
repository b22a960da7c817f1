"""Delivery pool processes: ``shardmail worker local --shards 0-3``.

Interface: ``run_local(settings, shards)`` (until SIGTERM), ``LocalJobs`` (runs the local jobs of
one claimed batch: ``__call__(claims) -> claims``), ``parse_shards("0-3,5") -> [0, 1, 2, 3, 5]``,
``deliver`` (the function name rq's jobs carry, so a stock ``rq worker`` can run a job too).

One process claims batches of jobs from its shards' local queues (workers.consumer): no fork per
job. Per message: read the spool entry, deliver each pending local recipient, append all their
marks with one fdatasync (the per-recipient checkpoint), and remove the entry once every
recipient of every channel is final. A message whose spool entry is gone (withdrawn, delivered,
held or deleted by an admin, also between its read and its checkpoint) is a finished job. In a
batch, the messages whose recipients are all plain Maildir copies of known entries
(``LocalDelivery.plain``) go to ``LocalDelivery.deliver_batch`` in the consumer's thread, which
returns their outcomes once their copies are durable together; the rest, and the directory
look-ups the cache cannot answer, run on a pool of ``concurrencylocal`` threads. This module only
claims, hands over and checkpoints: nothing is marked or removed before workers.local returned
its outcome, and a returned Maildir outcome is durable.

Failures: outcomes per recipient (see workers.local); a deferred recipient stays pending in the
spool with its reason marked, for the retry scheduler; an unreadable entry is left for the sweep.

Settings: ``concurrencylocal``, ``shards``, plus those of workers.local and core.directory.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Literal

from core import faults, metrics, sdnotify
from core.config import Settings
from core.directory import lookup_outcome, open_directory
from core.envelope import Channel, Envelope, EnvelopeError, Mark
from core.jobs import Claim, Jobs
from core.outcome import Deferred, Delivered, Outcome
from core.redis_conn import connect, connect_shared
from core.shards import Namespace
from core.spool import Spool
from core.submit import Submitter
from workers.consumer import Consumer
from workers.local import MAILDIR_ONLY, LocalDelivery

log = logging.getLogger("shardmail.pool")


def parse_shards(text: str, count: int) -> list[int]:
    if not text or text == "all":
        return list(range(count))
    shards: list[int] = []
    for part in text.split(","):
        low, _, high = part.partition("-")
        shards.extend(range(int(low), int(high or low) + 1))
    bad = [s for s in shards if not 0 <= s < count]
    if bad:
        raise ValueError(f"no such shard(s): {bad} (shards = {count})")
    return sorted(set(shards))


def _state(outcome: Outcome) -> Literal["delivered", "deferred", "failed"]:
    if isinstance(outcome, Delivered):
        return "delivered"
    return "deferred" if isinstance(outcome, Deferred) else "failed"


class LocalJobs:
    def __init__(self, settings: Settings, delivery: LocalDelivery, submitter: Submitter, threads: int) -> None:
        self.map = submitter.map
        self.delivery = delivery
        self.executor = ThreadPoolExecutor(threads, thread_name_prefix="local")

    def _load(self, claim: Claim) -> tuple[Spool, Envelope, bytes] | None:
        spool = self.map.spool(claim.shard)
        try:
            envelope, body = spool.load(claim.message_id)
        except FileNotFoundError:
            return None
        except EnvelopeError as exc:
            log.error("unreadable spool entry %s: %s (left for the sweep)", claim.message_id, exc)
            return None
        return spool, envelope, body

    def message(self, claim: Claim) -> None:
        """One message on its own, each Maildir copy fsync'd as it is written."""
        loaded = self._load(claim)
        if loaded is not None:
            self._deliver_alone(loaded)

    def _deliver_alone(self, loaded: tuple[Spool, Envelope, bytes]) -> bool:
        spool, envelope, body = loaded
        outcomes = [(index, self.delivery.deliver(envelope, index, body)) for index in envelope.pending("local")]
        return self._settle(spool, envelope, outcomes)

    def _settle(self, spool: Spool, envelope: Envelope, outcomes: list[tuple[int, Outcome]]) -> bool:
        """Log and checkpoint the outcomes, and drop the entry once every recipient is delivered or
        bounced; whether it was dropped (then the scheduler has nothing to settle)."""
        marks = []
        for index, outcome in outcomes:
            log.info("%s to <%s>: %s %s %s", envelope.id, envelope.recipients[index].address, _state(outcome),
                     outcome.status, outcome.text)
            marks.append(Mark(index, _state(outcome), outcome.status, outcome.text[:500], time.time()))
        metrics.outcomes("local", marks)
        faults.crash_point("before_local_mark")
        pending = envelope.pending()
        if (len(marks) == len(pending) and not envelope.unreported()
                and all(m.state == "delivered" and m.text.startswith(MAILDIR_ONLY) for m in marks)):
            # Everything left went into Maildirs just now, and no failure waits for its bounce: no
            # checkpoint is needed before the unlink, as a repeated attempt finds each copy by its
            # Maildir name (saves an fdatasync). Forwards and programs are not idempotent, so their
            # messages take the marked path.
            spool.remove(envelope.id, envelope.size)
            return True
        try:
            if marks:
                spool.mark(envelope.id, marks)
            if len(marks) == len(pending):  # pending was all local: the outcome is known without a re-read
                done = envelope.with_marks([*envelope.marks, *marks]).done()
            else:  # the remote channel marks the same file: read what it has recorded
                done = spool.read(envelope.id).done()
        except FileNotFoundError:  # held or deleted by an admin meanwhile (shardmail queue): a finished job
            log.warning("%s left the queue during its delivery (held or deleted): outcome not recorded", envelope.id)
            return True
        if done:  # every recipient delivered or bounced: a failed one waits for the scheduler's bounce
            spool.remove(envelope.id, envelope.size)
        return done

    def _warm(self, address: str) -> None:
        """Fill the directory cache (best effort: any failure is met again, and handled, by the
        message's own delivery)."""
        try:
            lookup_outcome(self.delivery.directory, address)
        except Exception:  # only a cache fill
            log.debug("directory look-up of %s ahead of its batch failed", address, exc_info=True)

    def __call__(self, claims: list[Claim]) -> list[Claim]:
        """A claimed batch: the plain Maildir copies are delivered in this thread, made durable
        together by ``LocalDelivery.deliver_batch``; everything else (directory misses,
        forwards, programs, cluster hops, quotas) runs message by message on the thread pool. The
        claims of entries removed here come back with ``settle=False``: no doorbell for the
        scheduler, which would only find them gone (everything else, deferred and failed
        recipients included, is still settled)."""
        loaded = [item for item in map(self._load, claims) if item is not None]
        directory = self.delivery.directory
        unknown = {envelope.recipients[i].address for _, envelope, _ in loaded for i in envelope.pending("local")
                   if not directory.cached(envelope.recipients[i].address)[0]}
        if unknown:  # directory round trips in parallel; failures are met again on the slow path
            list(self.executor.map(self._warm, unknown))
        fast: list[tuple[Spool, Envelope, bytes]] = []
        slow: list[tuple[Spool, Envelope, bytes]] = []
        for item in loaded:
            (fast if self.delivery.plain(item[1]) else slow).append(item)
        pending = [(item[1].id, self.executor.submit(self._deliver_alone, item)) for item in slow]
        removed: set[str] = set()
        try:
            if fast:
                delivered = self.delivery.deliver_batch([(envelope, body) for _, envelope, body in fast])
                for (spool, envelope, _), outcomes in zip(fast, delivered, strict=True):
                    if self._settle(spool, envelope, outcomes):
                        removed.add(envelope.id)
        finally:
            for message_id, future in pending:
                if future.result():
                    removed.add(message_id)
        return [replace(c, settle=False) if c.message_id in removed else c for c in claims]


_stock: LocalJobs | None = None


def deliver(shard: int, message_id: str, channel: str) -> None:
    """Entry point named in every rq job, for a stock rq worker: the same work as the pool's, on
    objects built once per worker process."""
    global _stock
    if channel != "local":
        return
    if _stock is None:
        from core.config import load

        settings = load()
        conn = connect(settings)
        submitter = Submitter(settings, conn)
        _stock = LocalJobs(settings, LocalDelivery(settings, open_directory(settings), submitter, conn), submitter, 1)
    _stock.message(Claim(f"{message_id}-{channel}", message_id, shard, "local", ""))


def run_local(settings: Settings, shards: list[int] | None, name: str | None = None) -> None:
    """Until SIGTERM; under a stable ``name`` it first takes back what a killed predecessor held.
    ``shards`` None: every shard, including those added while it runs."""
    conn = connect(settings, max_connections=settings.concurrencylocal + 4)
    submitter = Submitter(settings, conn)
    delivery = LocalDelivery(settings, open_directory(settings), submitter, connect_shared(settings))
    handler = LocalJobs(settings, delivery, submitter, settings.concurrencylocal)
    follow: Callable[[], list[tuple[int, Channel]]] | None = None
    if shards is None:
        follow = lambda: [(s, "local") for s in submitter.map.ids()]  # noqa: E731
    consumer = Consumer(Jobs(conn, Namespace.of(settings)), [(s, "local") for s in shards or []], handler,
                        batch=settings.concurrencylocal * 4, name=name, follow=follow)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    log.info("local pool on shards %s, %d threads", shards if shards is not None else "all",
             settings.concurrencylocal)
    sdnotify.ready("local pool")
    consumer.run(stop, stable_name=name is not None)
