"""Delivery pool processes: ``shardmail worker local --shards 0-3``.

Interface: ``run_local(settings, shards)`` (until SIGTERM), ``LocalJobs`` (runs the local jobs of
one claimed batch: ``__call__(claims) -> claims``), ``parse_shards("0-3,5") -> [0, 1, 2, 3, 5]``,
``deliver`` (the function name rq's jobs carry, so a stock ``rq worker`` can run a job too).

One process claims batches of jobs from its shards' local queues (workers.consumer) and runs
each message on a thread pool of ``concurrencylocal`` threads: no fork per job. Per message:
read the spool entry, deliver each pending local recipient, append all their marks with one
fdatasync (the per-recipient checkpoint), and remove the entry once every recipient of every
channel is final. A message whose spool entry is gone (withdrawn, delivered) is a finished job.

Failures: outcomes per recipient (see workers.local); a deferred recipient stays pending in the
spool with its reason marked, for the retry scheduler; an unreadable entry is left for the sweep.

Settings: ``concurrencylocal``, ``shards``, plus those of workers.local and core.directory.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

from core import faults
from core.config import Settings
from core.directory import open_directory
from core.envelope import EnvelopeError, Mark
from core.jobs import Claim, Jobs
from core.outcome import Deferred, Delivered, Outcome
from core.redis_conn import connect
from core.submit import Submitter
from workers.consumer import Consumer
from workers.local import LocalDelivery

log = logging.getLogger("shardmail.pool")
MAILDIR_ONLY = ("delivered to maildir", "already in the maildir")


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

    def message(self, claim: Claim) -> None:
        spool = self.map.spool(claim.shard)
        try:
            envelope, body = spool.load(claim.message_id)
        except FileNotFoundError:
            return
        except EnvelopeError as exc:
            log.error("unreadable spool entry %s: %s (left for the sweep)", claim.message_id, exc)
            return
        marks = []
        for index in envelope.pending("local"):
            outcome = self.delivery.deliver(envelope, index, body)
            log.info("%s to <%s>: %s %s %s", envelope.id, envelope.recipients[index].address, _state(outcome),
                     outcome.status, outcome.text)
            marks.append(Mark(index, _state(outcome), outcome.status, outcome.text[:500], time.time()))
        faults.crash_point("before_local_mark")
        pending = envelope.pending()
        if len(marks) == len(pending) and all(m.state == "delivered" and m.text.startswith(MAILDIR_ONLY)
                                              for m in marks):
            # Everything left went into Maildirs just now: no checkpoint is needed before the
            # unlink, as a repeated attempt finds each copy by its Maildir name (saves an fdatasync).
            # Forwards and programs are not idempotent, so their messages take the marked path.
            spool.remove(envelope.id, envelope.size)
            return
        if marks:
            spool.mark(envelope.id, marks)
        if len(marks) == len(pending):  # pending was all local: the outcome is known without a re-read
            done = not envelope.with_marks([*envelope.marks, *marks]).pending()
        else:  # the remote channel marks the same file: read what it has recorded
            done = not spool.read(envelope.id).pending()
        if done:
            spool.remove(envelope.id, envelope.size)

    def __call__(self, claims: list[Claim]) -> list[Claim]:
        list(self.executor.map(self.message, claims))
        return claims


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


def run_local(settings: Settings, shards: list[int]) -> None:
    conn = connect(settings, max_connections=settings.concurrencylocal + 4)
    submitter = Submitter(settings, conn)
    delivery = LocalDelivery(settings, open_directory(settings), submitter, conn)
    handler = LocalJobs(settings, delivery, submitter, settings.concurrencylocal)
    consumer = Consumer(Jobs(conn, settings.redis_prefix), [(s, "local") for s in shards], handler,
                        batch=settings.concurrencylocal * 4)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    log.info("local pool on shards %s, %d threads", shards, settings.concurrencylocal)
    consumer.run(stop)
