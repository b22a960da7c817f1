"""The remote delivery pool process: ``shardmail worker remote --shards 0-3 --concurrency N``.

Interface: ``run_remote(settings, shards, name=None)`` (until SIGTERM or SIGINT); ``serve(settings,
shards, stop, name=None)`` (the same, as a coroutine, for tests and benchmarks).

One asyncio loop (uvloop) holds every SMTP session (workers.remote). A claim task takes jobs from
the shards' remote queues in batches (core.jobs' one-round-trip claim, so rq's queues, started
registry and ``rq info`` stay truthful) while the engine holds fewer than ``remoteactivelimit``
messages; a finish task ends the jobs of finished messages in one pipeline every
``FINISH_EVERY`` seconds. Redis calls and spool writes run on small thread pools, so the loop never
waits on a disk or on Redis. The pool is registered in rq's worker registry with heartbeats, and
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

from core import metrics
from core.config import Settings
from core.envelope import EnvelopeError
from core.jobs import Claim, Jobs
from core.redis_conn import connect
from core.shards import ShardMap
from workers.consumer import HEARTBEAT, IDLE_WAIT, MAX_BACKOFF, announce, take_back
from workers.remote import RemoteEngine

log = logging.getLogger("shardmail.remote")
BATCH = 200  # jobs per claim round trip
FINISH_EVERY = 0.05  # s
STOP_GRACE = 10.0  # s for the transactions in flight when the pool stops
IO_THREADS = 2  # checkpoint group commits (one at a time) and removals of finished entries


async def _pause(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await stop.wait()


async def _finisher(jobs: Jobs, done: list[Claim], rpc: ThreadPoolExecutor, stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    while True:
        if done:
            batch = done[:]
            del done[: len(batch)]
            try:
                await loop.run_in_executor(rpc, jobs.finish, batch)
            except redis.RedisError as exc:
                log.warning("finishing %d jobs failed (%s); will retry", len(batch), exc)
                metrics.redis_error("remote")
                done[:0] = batch
                await _pause(stop, MAX_BACKOFF)
        if stop.is_set() and not done:
            return
        await asyncio.sleep(FINISH_EVERY)


async def serve(settings: Settings, shards: list[int] | None, stop: asyncio.Event, name: str | None = None) -> None:
    """The pool; ``name`` (stable across restarts, e.g. the supervisor's slot) lets it take back
    at start the jobs a killed previous process of that name held. ``shards`` None: every shard,
    including those added while it runs (looked up again every heartbeat)."""
    stable = name is not None
    name = name or f"{socket.gethostname()}.{os.getpid()}.remote"
    conn = connect(settings, max_connections=8)
    jobs = Jobs(conn, settings.redis_prefix)
    shard_map = ShardMap(settings)
    loop = asyncio.get_running_loop()
    rpc = ThreadPoolExecutor(2, thread_name_prefix="remote-redis")
    io = ThreadPoolExecutor(IO_THREADS, thread_name_prefix="remote-io")
    done: list[Claim] = []
    engine = RemoteEngine(settings, shard_map, done.append, io)
    finishing = asyncio.Event()
    finisher = loop.create_task(_finisher(jobs, done, rpc, finishing))
    follow = shards is None
    shards = shard_map.ids() if shards is None else shards
    queues = [(s, "remote") for s in shards]
    worker = None
    beat = 0.0
    backoff = IDLE_WAIT
    log.info("remote pool on shards %s: %d sessions, %d per destination", shards, settings.concurrencyremote,
             settings.concurrencydestination)
    reclaimed = not stable
    try:
        while not stop.is_set():
            taken = 0
            try:
                if not reclaimed:
                    await loop.run_in_executor(rpc, take_back, jobs, queues, name)
                    reclaimed = True
                if worker is None:
                    worker = await loop.run_in_executor(rpc, announce, jobs, queues, name)
                if time.monotonic() - beat > HEARTBEAT:
                    if follow and shard_map.ids() != shards:
                        shards = shard_map.ids()
                        queues = [(s, "remote") for s in shards]
                        log.info("now consuming shards %s", shards)
                        if worker is not None:
                            await loop.run_in_executor(rpc, worker.register_death)
                        worker = await loop.run_in_executor(rpc, announce, jobs, queues, name)
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
                            done.append(claim)  # delivered or withdrawn already
                            continue
                        except (EnvelopeError, OSError, UnicodeDecodeError) as exc:
                            log.error("unreadable spool entry %s: %s (left for the sweep)", claim.message_id, exc)
                            done.append(claim)
                            continue
                        engine.add(claim, envelope)
                backoff = IDLE_WAIT
            except redis.RedisError as exc:
                log.warning("Redis unavailable (%s); retrying in %.1f s", exc, backoff)
                metrics.redis_error("remote")
                worker = None
                await _pause(stop, backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
                continue
            if not taken:
                await _pause(stop, IDLE_WAIT)
    finally:
        left = await engine.stop(STOP_GRACE)
        finishing.set()
        await finisher
        if left:
            try:
                await loop.run_in_executor(rpc, jobs.release, left)
                log.info("gave %d unfinished jobs back to their queues", len(left))
            except redis.RedisError as exc:
                log.warning("could not give %d jobs back (%s): the sweep will", len(left), exc)
        if worker is not None:
            with contextlib.suppress(redis.RedisError):
                await loop.run_in_executor(rpc, worker.register_death)
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
