"""The job consumer every delivery pool runs: claim jobs in batches, hand them over, finish them.

Interface: ``Consumer(jobs, queues, handle, batch=100, name=..., wake_timeout=...)`` with
``run(stop)`` (until the event is set) and ``drain() -> int`` (until the queues are empty; for
tests and benchmarks); ``take_back(jobs, queues, name)`` (requeue what a killed process of the same name held).
``queues`` is a list of (shard, channel) (or ``follow``, a function giving the current list, for
a pool on every shard: shards added online are taken up within a heartbeat); ``handle(claims)``
does the work for a batch and returns the claims it is done with (the rest stay started, e.g.
while an asynchronous delivery is in flight, and are finished later through ``Jobs.finish``).

Why not rq's stock worker: it runs one job at a time with several Redis round trips and its own
bookkeeping per job (about 250 jobs/s per process, measured). Claiming N jobs per round trip with
``Jobs.claim_many`` keeps rq's registries truthful and costs one round trip per *batch*
(``bench/drain.py`` measures both): a batch's finish goes with the next claim of its channel,
which follows at once (the round found work); what is still unfinished when the consumer stops
is finished on its own. A finish lost with a Redis error leaves its claims started, as before:
rq's cleanup or the sweep moves them on when their lease ends.

A consumer that found nothing blocks on its queues' wake-up keys (``core.jobs.Waiter``, on a
connection of its own, at most ``WAKE_TIMEOUT``) rather than polling: an idle pool costs Redis
about one claim a second. Woken, it lets ``GATHER`` pass before it claims, so a trickle of mail
still comes in batches (each ingress commit rings; a local batch costs two syncfs whatever its
size), as often as the pools polled before. A stop is seen when the wait ends, within
``WAKE_TIMEOUT``; ``drain`` never waits.

While it runs, the consumer is registered in rq's worker registry (``Jobs.announce``: birth,
heartbeats every ``HEARTBEAT`` seconds, death at exit), so ``rq info`` and rq-dashboard list the pools with their
queues.

Failures: a handler that raises (a bug) puts the batch's unfinished claims into rq's failed
registry with the traceback, and the consumer goes on; Redis errors make it back off and retry
(the spool still holds every message, so nothing is lost while Redis is away).

Settings: none directly; pools pass their batch size and queues.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import traceback
from collections.abc import Callable, Sequence

import redis

from core import metrics
from core.envelope import Channel
from core.jobs import WAKE_TIMEOUT, Claim, Jobs, Registration, Waiter
from core.shards import shard_label

log = logging.getLogger("shardmail.consumer")
IDLE_WAIT = 0.05  # s: the first back-off after a Redis error
GATHER = 0.05  # s between a wake-up and the claim it asks for
HEARTBEAT = 10.0  # s between rq worker heartbeats
MAX_BACKOFF = 5.0

Handler = Callable[[list[Claim]], Sequence[Claim]]


def take_back(jobs: Jobs, queues: Sequence[tuple[int, Channel]], name: str) -> None:
    """At start, under a stable name: requeue the claims a killed previous life left behind."""
    count = sum(jobs.reclaim(shard, channel, name) for shard, channel in queues)
    if count:
        log.warning("took back %d jobs that %s held when it last stopped without finishing them", count, name)


class Consumer:
    def __init__(self, jobs: Jobs, queues: Sequence[tuple[int, Channel]], handle: Handler, batch: int = 100,
                 name: str | None = None, follow: Callable[[], Sequence[tuple[int, Channel]]] | None = None,
                 wake_timeout: float = WAKE_TIMEOUT) -> None:
        self.jobs = jobs
        self.wake_timeout = wake_timeout
        self.follow = follow  # asked again every heartbeat: a pool on "all" shards takes up added ones
        self.queues = list(follow() if follow is not None else queues)
        self.handle = handle
        self.batch = batch
        self.name = name or f"{socket.gethostname()}.{os.getpid()}"
        self._finished: dict[Channel, list[Claim]] = {}  # done, to be finished with the channel's next claim

    def _round(self) -> int:
        """One pass over every queue (one claim round trip per channel, up to ``batch`` jobs from
        each of its shards); returns how many jobs it took."""
        taken = 0
        by_channel: dict[Channel, list[int]] = {}
        for shard, channel in self.queues:
            by_channel.setdefault(channel, []).append(shard)
        for channel in [c for c in self._finished if c not in by_channel]:  # a channel no longer consumed
            self.jobs.finish(self._finished.pop(channel))
        for channel, shards in by_channel.items():
            claims = self.jobs.claim_many(shards, channel, self.batch, self.name,
                                          finished=self._finished.pop(channel, []))
            if not claims:
                continue
            taken += len(claims)
            try:
                done = self.handle(claims)
            except Exception:
                why = traceback.format_exc()
                log.error("handler failed for %d jobs: %s", len(claims), why)
                for claim in claims:
                    self.jobs.fail(claim, why)
                continue
            if done:
                self._finished[channel] = list(done)
        return taken

    def flush(self) -> None:
        """Finish what is done and not finished yet (the consumer stops)."""
        while self._finished:
            self.jobs.finish(self._finished.popitem()[1])

    def _refollow(self) -> bool:
        if self.follow is None:
            return False
        queues = list(self.follow())
        if queues == self.queues:
            return False
        log.info("now consuming %s", ", ".join(f"{shard_label(shard)}.{channel}" for shard, channel in queues))
        self.queues = queues
        return True

    def _rq_worker(self) -> Registration | None:
        return self.jobs.announce(self.queues, self.name)

    def run(self, stop: threading.Event, stable_name: bool = False) -> None:
        """Until ``stop``; with ``stable_name`` (the supervisor's slot names), claims left under this
        name by a killed earlier process are requeued first."""
        backoff = IDLE_WAIT
        worker = None
        beat = 0.0
        reclaimed = not stable_name
        waiter = Waiter(self.jobs, self.wake_timeout)
        try:
            while not stop.is_set():
                try:
                    if not reclaimed:
                        take_back(self.jobs, self.queues, self.name)
                        reclaimed = True
                    if worker is None:
                        worker = self._rq_worker()
                    if time.monotonic() - beat > HEARTBEAT:
                        if self._refollow() and worker is not None:
                            worker.death()
                            worker = self._rq_worker()  # registered again with its new queues
                        if worker is not None:
                            worker.heartbeat(int(HEARTBEAT * 3))
                        beat = time.monotonic()
                    taken = self._round()
                    backoff = IDLE_WAIT
                    if not taken and not stop.is_set() and waiter.wait(self.queues):
                        stop.wait(GATHER)
                except redis.RedisError as exc:
                    log.warning("Redis unavailable (%s); retrying in %.1f s", exc, backoff)
                    metrics.redis_error("local")
                    worker = None
                    stop.wait(backoff)
                    backoff = min(backoff * 2, MAX_BACKOFF)
        finally:
            waiter.close()
            with contextlib.suppress(redis.RedisError):
                self.flush()
            if worker is not None:
                with contextlib.suppress(redis.RedisError):
                    worker.death()

    def drain(self) -> int:
        total = 0
        while True:
            taken = self._round()
            if not taken:
                self.flush()
                return total
            total += taken

