"""The remote delivery pool process: ``shardmail worker remote --shards 0-3 --concurrency N``.

Interface: ``run_remote(settings, shards, name=None)`` (until SIGTERM or SIGINT); ``serve(settings,
shards, stop, name=None, wake_timeout=...)`` (the same, as a coroutine, for tests and benchmarks).

One asyncio loop (uvloop) holds every SMTP session (workers.remote). A claim task takes jobs from
the shards' remote queues in batches (core.jobs' one-round-trip claim, so rq's queues, started
registry and ``rq info`` stay truthful) while the engine holds fewer than ``remoteactivelimit``
messages; a finish task ends the jobs of finished messages in one pipeline, at most every
``FINISH_EVERY`` seconds (and sleeps while there are none). Redis calls and spool writes run on
small thread pools, so the loop never waits on a disk or on Redis. When a claim finds nothing, the
claim task waits on the queues' wake-up keys (``core.jobs.Waiter``, on a thread and a connection of
their own) instead of polling: new jobs wake it (and ``GATHER`` later it claims, so a trickle of
mail still comes in batches), an idle pool asks Redis about once a second (``WAKE_TIMEOUT``), and a
stop ends the wait at once. The pool is registered in rq's worker registry with heartbeats, and
with each heartbeat renews the leases of the jobs it holds.

On stop: no new claims, transactions in flight get ``STOP_GRACE`` seconds to end, every
checkpoint is made durable, finished jobs are finished, and the jobs of messages not finished go
back to the head of their queues (their delivered recipients are marked, so only the rest is
tried again).

Failures: Redis unavailable → the loops back off (up to ``MAX_BACKOFF``) and retry; the spool keeps
every message meanwhile. An unreadable spool entry is logged and its job finished (the sweep
moves the entry aside).

Settings: ``concurrencyremote``, ``remoteactivelimit``, ``shards``, plus those of workers.remote.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import redis

from core import metrics, sdnotify
from core.config import Settings
from core.envelope import Channel, EnvelopeError
from core.jobs import WAKE_TIMEOUT, Claim, Jobs, Waiter
from core.redis_conn import connect
from core.shards import Namespace, ShardMap
from workers.consumer import GATHER, HEARTBEAT, IDLE_WAIT, MAX_BACKOFF, take_back
from workers.remote import RemoteEngine

log = logging.getLogger("shardmail.remote")
BATCH = 200  # jobs per claim round trip
FINISH_EVERY = 0.05  # s a finished job may wait for others to share its pipeline
FULL_WAIT = 0.05  # s between looks for room while the engine holds ``remoteactivelimit`` messages
STOP_GRACE = 10.0  # s for the transactions in flight when the pool stops
IO_THREADS = 2  # checkpoint group commits (one at a time) and removals of finished entries


async def _pause(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await stop.wait()


async def _finisher(jobs: Jobs, done: list[Claim], ready: asyncio.Event, rpc: ThreadPoolExecutor,
                    stop: asyncio.Event) -> None:
    """Finish what ``done`` collects, once ``ready`` says it holds something (the caller sets it
    with each append, and with ``stop``)."""
    loop = asyncio.get_running_loop()
    while True:
        await ready.wait()
        await asyncio.sleep(FINISH_EVERY)  # let a batch gather
        ready.clear()
        if done:
            batch = done[:]
            del done[: len(batch)]
            try:
                await loop.run_in_executor(rpc, jobs.finish, batch)
            except redis.RedisError as exc:
                log.warning("finishing %d jobs failed (%s); will retry", len(batch), exc)
                metrics.redis_error("remote")
                done[:0] = batch
                ready.set()
                await _pause(stop, MAX_BACKOFF)
        if stop.is_set() and not done:
            return


class _Wakeup:
    """The claim task's wait for work: ``Waiter.wait`` on a thread of its own (the rpc threads stay
    free for finishing), given up at once on stop; the pop left running then ends within its
    timeout, and closes the connection."""

    def __init__(self, jobs: Jobs, timeout: float) -> None:
        self.waiter = Waiter(jobs, timeout)
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="remote-wake")
        self.pending: asyncio.Future[bool] | None = None

    async def wait(self, queues: list[tuple[int, Channel]], stop: asyncio.Event) -> bool:
        """Whether a producer rang (False: timeout or stop)."""
        loop = asyncio.get_running_loop()
        self.pending = ringing = loop.run_in_executor(self.thread, self.waiter.wait, queues)
        stopping = loop.create_task(stop.wait())
        try:
            await asyncio.wait((ringing, stopping), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
        if not ringing.done():
            return False
        self.pending = None
        return ringing.result()  # or a RedisError: the caller backs off

    def close(self) -> None:
        if self.pending is None:
            self.waiter.close()
        else:  # still blocked: close once the pop returns (its error, if any, is of no interest now)
            self.pending.add_done_callback(lambda f: self.waiter.close())
        self.thread.shutdown(wait=False)


async def serve(settings: Settings, shards: list[int] | None, stop: asyncio.Event, name: str | None = None,
                wake_timeout: float = WAKE_TIMEOUT) -> None:
    """The pool; ``name`` (stable across restarts, e.g. the supervisor's slot) lets it take back
    at start the jobs a killed previous process of that name held. ``shards`` None: every shard,
    including those added while it runs (looked up again every heartbeat). ``wake_timeout``: the
    longest idle wait before a claim that no producer asked for."""
    stable = name is not None
    name = name or f"{socket.gethostname()}.{os.getpid()}.remote"
    conn = connect(settings, max_connections=8)
    jobs = Jobs(conn, Namespace.of(settings))
    shard_map = ShardMap(settings)
    loop = asyncio.get_running_loop()
    rpc = ThreadPoolExecutor(2, thread_name_prefix="remote-redis")
    io = ThreadPoolExecutor(IO_THREADS, thread_name_prefix="remote-io")
    done: list[Claim] = []
    ready = asyncio.Event()

    def finished(claim: Claim) -> None:
        done.append(claim)
        ready.set()

    engine = RemoteEngine(settings, shard_map, finished, io)
    finishing = asyncio.Event()
    finisher = loop.create_task(_finisher(jobs, done, ready, rpc, finishing))
    wakeup = _Wakeup(jobs, wake_timeout)
    follow = shards is None
    shards = shard_map.ids() if shards is None else shards
    queues: list[tuple[int, Channel]] = [(s, "remote") for s in shards]
    worker = None
    beat = 0.0
    backoff = IDLE_WAIT
    log.info("remote pool on shards %s: %d sessions, %d per destination", shards, settings.concurrencyremote,
             settings.concurrencydestination)
    sdnotify.ready("remote pool")
    reclaimed = not stable
    try:
        while not stop.is_set():
            taken = 0
            try:
                if not reclaimed:
                    await loop.run_in_executor(rpc, take_back, jobs, queues, name)
                    reclaimed = True
                if worker is None:
                    worker = await loop.run_in_executor(rpc, jobs.announce, queues, name)
                if time.monotonic() - beat > HEARTBEAT:
                    if follow and shard_map.ids() != shards:
                        shards = shard_map.ids()
                        queues = [(s, "remote") for s in shards]
                        log.info("now consuming shards %s", shards)
                        if worker is not None:
                            await loop.run_in_executor(rpc, worker.death)
                        worker = await loop.run_in_executor(rpc, jobs.announce, queues, name)
                    if worker is not None:
                        await loop.run_in_executor(rpc, worker.heartbeat, int(HEARTBEAT * 3))
                    await loop.run_in_executor(rpc, jobs.extend, engine.claims())
                    beat = time.monotonic()
                room = settings.remoteactivelimit - engine.in_memory
                if room > 0:
                    each = max(1, min(room, BATCH) // len(shards))
                    claims = await loop.run_in_executor(rpc, jobs.claim_many, shards, "remote", each, name)
                    taken += len(claims)
                    for claim in claims:
                        try:
                            envelope = shard_map.spool(claim.shard).read(claim.message_id)
                        except FileNotFoundError:
                            finished(claim)  # delivered or withdrawn already
                            continue
                        except (EnvelopeError, OSError, UnicodeDecodeError) as exc:
                            log.error("unreadable spool entry %s: %s (left for the sweep)", claim.message_id, exc)
                            finished(claim)
                            continue
                        engine.add(claim, envelope)
                backoff = IDLE_WAIT
                if room <= 0:
                    await _pause(stop, FULL_WAIT)  # busy, not idle: room comes as messages finish
                elif not taken and await wakeup.wait(queues, stop):
                    await _pause(stop, GATHER)
            except redis.RedisError as exc:
                log.warning("Redis unavailable (%s); retrying in %.1f s", exc, backoff)
                metrics.redis_error("remote")
                worker = None
                await _pause(stop, backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
    finally:
        wakeup.close()
        left = await engine.stop(STOP_GRACE)
        finishing.set()
        ready.set()
        await finisher
        if left:
            try:
                await loop.run_in_executor(rpc, jobs.release, left)
                log.info("gave %d unfinished jobs back to their queues", len(left))
            except redis.RedisError as exc:
                log.warning("could not give %d jobs back (%s): the sweep will", len(left), exc)
        if worker is not None:
            with contextlib.suppress(redis.RedisError):
                await loop.run_in_executor(rpc, worker.death)
        rpc.shutdown()
        io.shutdown()


def run_remote(settings: Settings, shards: list[int] | None, name: str | None = None) -> None:
    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await serve(settings, shards, stop, name)

    try:
        import uvloop
    except ImportError:
        asyncio.run(main())
    else:
        uvloop.run(main())
