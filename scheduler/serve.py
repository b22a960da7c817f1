"""``shardmail scheduler``: retries, bounces and sweeps, one leader per shard.

Interface: ``Scheduler(settings, conn, name)`` with ``run(stop)`` (until the event is set) and
``step() -> int`` (one pass over the shards it leads; for tests); ``run_scheduler(settings)`` (the
process, until SIGTERM).

Several schedulers may run (on one node or many): each shard is led by whoever holds its Redis
lease (core.lease: renewed on every pass, lost within ``LEASE_MS`` by a holder that dies or
stalls, given up while the rebalancer holds the shard's pause key). For each shard it leads, a
pass settles finished attempts from the settle list (scheduler.retry), releases due retries into
the queues, and every ``sweepinterval`` seconds, and whenever it takes a lease afresh (a new lead,
or its own again after Redis lost everything), sweeps the shard's spool (scheduler.sweep).

The scheduler also carries the node's heartbeat (core.nodes): it claims the node's name at start
(refused while another live node holds it) and renews it every few seconds (core.nodes' ``interval``) with the
node's shards and spool figures, which ``shardmail status --cluster`` shows for every node. Every
node runs at least one scheduler; several on one node share the spool's identity, so their
heartbeats are one node's. Beside the heartbeat runs an optional companion thread, started with
the loop and stopped with it: ``shardmail scheduler`` passes the one that answers what other nodes
ask about this node's spool (ops.ask, ``qshape --cluster``, ``queue list --cluster``), so every
node that beats also answers.

Failures: the node's name held by another live node, or a spool belonging to another node, ends
``run_scheduler`` at start with one line saying so (exit 78); later, a conflict is logged at every
heartbeat and the scheduler goes on (its spool's mail stays its own). Redis unavailable → the pass
is skipped and retried with a growing pause (up to 5 s); the spool keeps everything meanwhile and
nothing is bounced for it. Disk errors on one message are logged by the parts; the loop goes on.

Settings: ``shards``, ``sweepinterval``, ``redis_prefix``, ``node``, ``nodedeadafter``, ``smtp_listen``,
plus those of scheduler.retry.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable

import redis

from core import metrics, sdnotify
from core.config import Settings
from core.lease import Leases
from core.nodes import Identity, NodeConflict, Registry, SpoolOwned, beat_of
from core.outcome import EX_CONFIG
from core.shards import Namespace
from core.spool import Listings
from core.submit import Submitter
from scheduler.retry import Settler
from scheduler.sweep import Sweeper

log = logging.getLogger("shardmail.scheduler")
PASS_WAIT = 0.2  # s between passes when there was nothing to do (an idle pass: two round trips)
MAX_BACKOFF = 5.0
COMPANION_JOIN = 2.0  # s to wait at shutdown for the companion thread
Companion = Callable[[threading.Event], threading.Thread]  # started with an event set when the loop ends


class Scheduler:
    def __init__(self, settings: Settings, conn: redis.Redis, name: str | None = None,
                 shared: redis.Redis | None = None) -> None:
        """``conn``: the deployment of this node's queues; ``shared``: the cluster's main one (the
        node registry), the same unless shard groups put the queues elsewhere."""
        self.settings = settings
        self.settler = Settler(settings, conn, Submitter(settings, conn))
        self.sweeper = Sweeper(self.settler)
        self.name = name or f"{socket.gethostname()}.{os.getpid()}.scheduler"
        self.leases = Leases(conn, Namespace.of(settings), self.name, self.settler.map.ids)
        self._swept: dict[int, float] = {}
        self.led: list[int] = []
        self.identity = Identity.of(settings)
        self.registry = Registry.of(settings, shared or conn)
        self._listings = Listings()
        self._started = time.time()
        self._beat = -1e9

    def heartbeat(self) -> None:
        """Claim the node's name and announce its shards and spool figures (NodeConflict if another
        live node holds the name)."""
        address = self.settings.smtp_listen[0] if self.settings.smtp_listen else ""
        qmqp = self.settings.qmqp_listen[0] if self.settings.qmqp_listen else ""
        beat = beat_of(self.settler.map, self._listings, address, self._started, qmqp)
        self.registry.claim(self.identity, beat, time.time())
        self._beat = time.monotonic()

    def step(self) -> int:
        """One pass; returns how much work it found."""
        leases = [(shard, fresh) for shard, fresh in self.leases.renew() if fresh is not None]
        self.led = [shard for shard, _ in leases]
        waiting = self.settler.jobs.pending_work(self.led, self.settler.clock()) if self.led else {}
        work = 0
        for shard, fresh in leases:
            if fresh or time.monotonic() - self._swept.get(shard, -1e9) >= self.settings.sweepinterval:
                report = self.sweeper.sweep(shard)
                self._swept[shard] = time.monotonic()
                if report.scheduled or report.removed or report.corrupt or report.leftovers:
                    log.info("swept shard %d: %d entries, %d rescheduled, %d bounced, %d removed, %d leftovers, "
                             "%d corrupt", shard, report.entries, report.scheduled, report.bounced, report.removed,
                             report.leftovers, len(report.corrupt))
            settle, due = waiting.get(shard, (1, 1))
            if settle:
                work += self.settler.settle_batch(shard)
            if due:
                work += self.settler.release(shard)
        for shard in list(self._swept):
            if shard not in self.led:
                del self._swept[shard]  # lost the lead: sweep again on taking it back
        return work

    def run(self, stop: threading.Event, companion: Companion | None = None) -> None:
        backoff = PASS_WAIT
        log.info("scheduler %s for shards %s", self.name, self.settler.map.ids())
        ended = threading.Event()  # set when this loop ends, however it ends
        beside = companion(ended) if companion is not None else None
        sdnotify.ready("scheduler")
        try:
            while not stop.is_set():
                try:
                    if time.monotonic() - self._beat >= self.registry.interval:
                        try:
                            self.heartbeat()
                        except NodeConflict as exc:
                            log.error("%s", exc)
                            self._beat = time.monotonic()
                    work = self.step()
                    backoff = PASS_WAIT
                except redis.RedisError as exc:
                    log.warning("Redis unavailable (%s); retrying in %.1f s", exc, backoff)
                    metrics.redis_error("scheduler")
                    stop.wait(backoff)
                    backoff = min(backoff * 2, MAX_BACKOFF)
                    continue
                if not work:
                    stop.wait(PASS_WAIT)
        finally:
            ended.set()
            with contextlib.suppress(redis.RedisError):
                self.leases.give_up(self.led)
            if beside is not None:
                beside.join(COMPANION_JOIN)


def run_scheduler(settings: Settings, companion: Companion | None = None) -> None:
    import signal

    from core.redis_conn import connect, connect_shared

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        scheduler = Scheduler(settings, connect(settings), shared=connect_shared(settings))
        scheduler.heartbeat()
    except (NodeConflict, SpoolOwned) as exc:
        log.error("%s", exc)
        raise SystemExit(EX_CONFIG) from None
    except redis.RedisError as exc:  # the loop tries again: a node shown late is no harm
        log.warning("heartbeat not sent (%s); trying again in the loop", exc)
    scheduler.run(stop, companion)
