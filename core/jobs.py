"""The only place rq jobs and the scheduler's Redis structures are named, created and consumed.

Interface: ``queue_name(space, shard, channel)``, ``job_id(space, message_id, channel)``,
``message_of(job_id)``, ``pause_key(space, shard)``, ``wake_key(space, shard, channel)``,
``Jobs(conn, space)`` (``space``: core.shards' ``Namespace``, the cluster's prefix and this node) with
``enqueue(items)``, ``claim(shard, channel, count, worker)``, ``claim_many`` (with the finish of
the previous batch in the same round trip),
``finish(claims)``, ``extend(claims)``, ``release(claims)``, ``reclaim(shard, channel, worker)``,
``fail(claim, why)``, ``depths(shards)``, ``wake(queues)``; ``Waiter(jobs, timeout)`` (an idle
pool's blocking wait); ``announce(queues, name) -> Registration`` (a pool in rq's worker registry:
``heartbeat(ttl)``, ``death()``);
for the views ``in_flight(shards)`` (messages with a live claim), ``doorbells(shard)`` (every
``<id>:<channel>`` Redis knows), ``queued(shard, channel)``, ``census(shards, now)`` (every
queue figure and the live workers, one round trip: ``ShardFigures``, ``QueueFigures``, ``WorkerRecord``);
for the scheduler ``settled(shard, n)``, ``schedule(shard, entries)``, ``due(shard, now, n)``,
``release_due(shard, entries)``, ``unschedule(shard, id)``; for admins ``forget(shard, id, now)``,
``bring_forward(shard, now, n)``, ``drop_queued(shard, channel, ids)``, ``purge(shards)`` (a dead
node's, once adopted); ``settle_key``/``retry_key``;
``DELIVER_FUNC`` (the function name the jobs carry, for rq's tools).

Every name carries the node (``<node>/s<N>`` in keys, ``<prefix>.<node>.s<N>.<channel>`` for
queues, ``<node>-<message id>-<channel>`` for jobs): a node's calls reach its own shards only, so
nodes sharing a Redis and a prefix never claim, settle or remove each other's mail.

Per shard, besides rq's queues and registries: ``<prefix>:settle:<node>/s<N>``, a list of
``<id>:<channel>`` that every finished job adds (the attempt is over: the scheduler looks at what
it left), and ``<prefix>:retry:<node>/s<N>``, a sorted set of ``<id>:<channel>`` scored by the time of
the next attempt (deferred mail, and mail recovered from the spool: about 100 bytes of Redis each,
where an rq job costs about 540); the scheduler turns due entries into jobs.
``<prefix>:tally:<unix minute>`` (a hash living ``TALLY_TTL`` seconds) counts jobs enqueued
(``in:<node>/s<N>:<channel>``: new mail and released retries) and finished (``out:...``) per minute, one
HINCRBY per shard and channel in the pipeline that does the work, for ``shardmail status``'s rates.

Waking idle pools: ``<prefix>:wake:<node>/s<N>:<channel>`` is a sorted set holding at most one member
(``ZADD`` of the same member, so it never grows, whether or not a pool is listening). Every push
onto a queue (``enqueue``, so new mail and released retries; ``release``) sets it in the same
pipeline, one command per shard and channel of the batch, not per job; the claim script sets it
again when it leaves jobs behind, so a second pool of the same queue wakes up too and every
process ramps up under load. A pool that found nothing blocks in ``BZPOPMIN`` on the keys of its
own queues (``Waiter``: a connection of its own, ``WAKE_TIMEOUT`` at most) instead of polling: a
push between its empty claim and its wait leaves the member set, so the wait returns at once. Per
shard rather than per channel, because pools of other nodes on other shards share the Redis: a
ring for one shard must not be taken by a pool that cannot claim from it. A producer that does not
ring (an older process; a shard's pause ending) is still served within ``WAKE_TIMEOUT``.

Granularity and consumer (the decision the drain benchmark in ``bench/drain.py`` measures): one
rq job per message and channel, with a deterministic id ``<node>-<message id>-<channel>``, a JSON
payload ``[shard, message id, channel]`` and ``result_ttl=0``; so ``rq info``, rq-dashboard and
the sweep see exactly which messages wait where, and a re-enqueue of the same message is
recognisable. Stock rq workers run one job at a time with several Redis round trips and
bookkeeping each (about 250 jobs/s per process); shardmail's pools instead *claim* up to N jobs
per round trip with one Lua script that pops them from the queue list and records them in rq's
StartedJobRegistry (``<job id>:<execution id>`` entries, the format rq 2+ uses) with status
``started``, then *finish* them in one pipeline (job hash deleted, registry entry removed). rq's
own data model stays truthful: queue lengths, started registry, failed registry, job statuses.

Failures: every ``redis.RedisError`` propagates; callers treat it as temporary. A claimed job
whose consumer dies stays in the started registry until its lease expires; then rq's own registry
cleanup (or shardmail's sweep) moves it on, and the spool still holds the message.

Settings: ``redis_prefix``, ``node`` (via the namespace passed in).
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import redis
from rq import Queue, Worker
from rq.registry import FailedJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer
from rq.utils import now, utcformat
from rq.worker_registration import REDIS_WORKER_KEYS, WORKERS_BY_QUEUE_KEY

from core.envelope import CHANNELS, Channel
from core.redis_conn import private_client, socket_timeout
from core.redis_conn import text as _text
from core.shards import LABEL_PATTERN, Namespace, shard_label

log = logging.getLogger("shardmail.jobs")
DELIVER_FUNC = "workers.pool.deliver"
CLAIM_LEASE = 600  # seconds a claim may run before rq's cleanup considers it abandoned
FAILURE_TTL = 7 * 86400  # seconds a job that raised stays in rq's failed registry
TALLY_TTL = 180  # seconds a per-minute tally hash lives (``shardmail status`` reads this minute's and the last)
WAKE_TIMEOUT = 1.0  # s an idle pool blocks on its wake-up keys before it claims anyway (and sees a stop)

# Up to ARGV[1] jobs from each shard's queue, recorded as started; KEYS, four a shard: queue list,
# started registry, pause key, wake key. One call for every shard of a claim round (a script call
# per shard cost Redis about as much again as the jobs it took, and redis-py checks a pipeline's
# scripts with SCRIPT EXISTS first: one more round trip). Returns a list of job ids per shard.
_CLAIM = """
local out = {}
for i = 1, #KEYS, 4 do
  local ids = false
  if redis.call('EXISTS', KEYS[i + 2]) == 0 then ids = redis.call('LPOP', KEYS[i], ARGV[1]) end
  if ids then
    if redis.call('LLEN', KEYS[i]) > 0 then redis.call('ZADD', KEYS[i + 3], 0, '1') end
    for _, id in ipairs(ids) do
      redis.call('HSET', ARGV[2] .. id, 'status', 'started', 'started_at', ARGV[3], 'worker_name', ARGV[4])
      redis.call('ZADD', KEYS[i + 1], ARGV[5], id .. ':' .. ARGV[6])
    end
    out[#out + 1] = ids
  else
    out[#out + 1] = {}
  end
end
return out
"""


# One (message, channel): drop its queued job, retry entry and failed job, and an abandoned claim;
# a claim in flight is left alone and reported. KEYS: queue list, started registry, failed
# registry, job hash, retry set; ARGV: job id, retry member, now. Returns {dropped, claim}:
# dropped > 0 if a queued job or retry entry went; claim 0 none, 1 in flight, 2 abandoned (cleared).
_FORGET = """
local dropped = redis.call('LREM', KEYS[1], 0, ARGV[1]) + redis.call('ZREM', KEYS[5], ARGV[2])
redis.call('ZREM', KEYS[3], ARGV[1])
local status = redis.call('HGET', KEYS[4], 'status')
if status == 'started' then
  local prefix = ARGV[1] .. ':'
  local members = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
  for i = 1, #members, 2 do
    if string.sub(members[i], 1, #prefix) == prefix then
      if tonumber(members[i + 1]) > tonumber(ARGV[3]) then return {dropped, 1} end
      redis.call('ZREM', KEYS[2], members[i])
    end
  end
  redis.call('DEL', KEYS[4])
  return {dropped, 2}
end
if status then redis.call('DEL', KEYS[4]) end
return {dropped, 0}
"""

# Retry entries due later, rescored to now (ARGV[1]), up to ARGV[2] of them; returns them.
_FLUSH = """
local members = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. ARGV[1], '+inf', 'LIMIT', 0, tonumber(ARGV[2]))
for _, member in ipairs(members) do redis.call('ZADD', KEYS[1], ARGV[1], member) end
return members
"""

# Job ids (ARGV[2..]) taken out of a queue list (KEYS[1]) in one pass, their hashes too while they
# still name that queue (ARGV[1]) as their origin; returns how many went.
_DROP_QUEUED = """
local drop = {}
for i = 2, #ARGV do drop[ARGV[i]] = true end
local items = redis.call('LRANGE', KEYS[1], 0, -1)
local keep, removed = {}, 0
for _, id in ipairs(items) do
  if drop[id] then
    removed = removed + 1
    if redis.call('HGET', 'rq:job:' .. id, 'origin') == ARGV[1] then redis.call('DEL', 'rq:job:' .. id) end
  else
    keep[#keep + 1] = id
  end
end
if removed > 0 then
  redis.call('DEL', KEYS[1])
  for i = 1, #keep, 5000 do redis.call('RPUSH', KEYS[1], unpack(keep, i, math.min(i + 4999, #keep))) end
end
return removed
"""


# Every live rq worker (its hash still there, no death recorded): key, queues, state, last heartbeat.
_WORKERS = """
local out = {}
for _, key in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local fields = redis.call('HMGET', key, 'queues', 'state', 'last_heartbeat', 'death')
  if fields[1] and not fields[4] then
    table.insert(out, key)
    table.insert(out, fields[1])
    table.insert(out, fields[2] or '')
    table.insert(out, fields[3] or '')
  end
end
return out
"""


def _member(raw: Any) -> tuple[str, Channel]:
    text = _text(raw)
    message_id, _, channel = text.rpartition(":")
    return message_id, channel  # type: ignore[return-value]


def queue_name(space: Namespace, shard: int, channel: Channel) -> str:
    """``<prefix>.<node>.s<N>.<channel>``: dots, not the ``/`` of the shard's address, because
    rq-dashboard puts queue names in URL paths."""
    return f"{space.prefix}.{space.node}.{shard_label(shard)}.{channel}"


def pause_key(space: Namespace, shard: int) -> str:
    """While this key exists (the rebalancer holds it, with an expiry), nothing is claimed from the
    shard's queues."""
    return space.key("paused", shard)


def wake_key(space: Namespace, shard: int, channel: Channel) -> str:
    """The key an idle pool of this queue blocks on, set by every push onto the queue."""
    return f"{space.key('wake', shard)}:{channel}"


def job_id(space: Namespace, message_id: str, channel: Channel) -> str:
    """``<node>-<message id>-<channel>``: unique in the cluster whatever two nodes' ids share (rq
    allows only letters, digits, ``-`` and ``_`` in job ids, hence no ``/``)."""
    return f"{space.node}-{message_id}-{channel}"


def message_of(job: str) -> str:
    """The message id in a job id (node names may hold ``-``: counted from the right)."""
    return job.rsplit("-", 2)[-2]


@dataclass(frozen=True, slots=True)
class Claim:
    """A job taken from a queue by a consumer: which message, which channel, under which execution.
    ``settle=False`` (set by a consumer that removed the spool entry itself: nothing is left to
    retry or bounce) finishes the job without ringing the scheduler's doorbell."""

    job_id: str
    message_id: str
    shard: int
    channel: Channel
    execution: str
    settle: bool = True


@dataclass(frozen=True, slots=True)
class Item:
    """One job to enqueue."""

    shard: int
    message_id: str
    channel: Channel
    recipients: int = 1


@dataclass(frozen=True, slots=True)
class QueueFigures:
    """One rq queue: jobs ready, claimed (started registry) and failed (failed registry), the message
    at the head of the ready list, and the jobs that entered and left it this minute and the last."""

    ready: int = 0
    in_flight: int = 0
    failed: int = 0
    head: str | None = None
    entered: tuple[int, int] = (0, 0)
    left: tuple[int, int] = (0, 0)


@dataclass(frozen=True, slots=True)
class ShardFigures:
    """One shard's Redis figures: its queues, its retry set (deferred, and due by now), its settle
    list, and whether a rebalance holds its pause key."""

    channels: dict[Channel, QueueFigures]
    deferred: int = 0
    due: int = 0
    settling: int = 0
    paused: bool = False


@dataclass(frozen=True, slots=True)
class WorkerRecord:
    """A live worker in rq's registry serving this deployment's queues."""

    name: str
    queues: list[tuple[int, str]]
    state: str = ""
    heartbeat: str = ""


class Registration:
    """A pool's entry in rq's worker registry (what ``rq info`` and rq-dashboard list)."""

    def __init__(self, worker: Worker) -> None:
        self._worker = worker

    def heartbeat(self, ttl: int) -> None:
        """Alive for ``ttl`` more seconds."""
        self._worker.heartbeat(ttl)

    def death(self) -> None:
        """Gone from the registry (a pool stopping, or re-registering with other queues)."""
        self._worker.register_death()


class Jobs:
    """rq queues of one Redis deployment, cached per (shard, channel)."""

    def __init__(self, conn: redis.Redis, space: Namespace) -> None:
        self.conn = conn
        self.space = space
        self.prefix = space.prefix
        self._queues: dict[tuple[int, str], Queue] = {}
        self._claim = conn.register_script(_CLAIM)
        self._forget = conn.register_script(_FORGET)
        self._flush = conn.register_script(_FLUSH)
        self._drop_queued = conn.register_script(_DROP_QUEUED)
        self._registries: dict[tuple[int, str], tuple[str, str]] = {}
        self._queue_re = re.compile(rf"{re.escape(space.prefix)}\.{re.escape(space.node)}\.{LABEL_PATTERN}"
                                    rf"\.({'|'.join(CHANNELS)})")

    def _started(self, shard: int, channel: Channel) -> str:
        """The key of the queue's StartedJobRegistry (cached: a registry object per call cost more
        than the command that uses it)."""
        return self._keys(shard, channel)[0]

    def _failed(self, shard: int, channel: Channel) -> str:
        return self._keys(shard, channel)[1]

    def _keys(self, shard: int, channel: Channel) -> tuple[str, str]:
        keys = self._registries.get((shard, channel))
        if keys is None:
            queue = self.queue(shard, channel)
            keys = self._registries[shard, channel] = (StartedJobRegistry(queue=queue).key,
                                                        FailedJobRegistry(queue=queue).key)
        return keys

    def queue(self, shard: int, channel: Channel) -> Queue:
        key = (shard, channel)
        queue = self._queues.get(key)
        if queue is None:
            queue = Queue(
                queue_name(self.space, shard, channel), connection=self.conn, serializer=JSONSerializer
            )
            self._queues[key] = queue
        return queue

    def enqueue(self, items: Iterable[Item]) -> None:
        """Create and push every job in one pipelined round trip.

        The job hash holds the fields rq's ``Job.restore`` reads (status, times, origin,
        description, timeouts, and ``data``: the JSON serializer's ``[func, None, args, {}]``,
        uncompressed, which rq accepts), written directly: rq's own enqueue path builds a Job
        object per message and took about 45 % of the ingress commit thread's Python time."""
        stamp = utcformat(now())
        queues: set[str] = set()
        tally: dict[tuple[int, Channel], int] = {}
        with self.conn.pipeline(transaction=False) as pipe:
            for item in items:
                tally[item.shard, item.channel] = tally.get((item.shard, item.channel), 0) + 1
                ident = job_id(self.space, item.message_id, item.channel)
                name = queue_name(self.space, item.shard, item.channel)
                description = (f"deliver {item.message_id} ({item.recipients} rcpt) via {item.channel}"
                               if item.recipients else f"retry {item.message_id} via {item.channel}")
                data = json.dumps([DELIVER_FUNC, None, [item.shard, item.message_id, item.channel], {}])
                pipe.hset(f"rq:job:{ident}", mapping={
                    "status": "queued", "created_at": stamp, "enqueued_at": stamp, "data": data, "origin": name,
                    "description": description, "timeout": CLAIM_LEASE, "result_ttl": 0,
                    "failure_ttl": FAILURE_TTL})
                pipe.rpush(f"rq:queue:{name}", ident)
                queues.add(f"rq:queue:{name}")
            if queues:
                pipe.sadd("rq:queues", *queues)
            self._tally(pipe, "in", tally)
            self._ring(pipe, tally)
            pipe.execute()

    def wake(self, queues: Iterable[tuple[int, Channel]]) -> None:
        """Wake the idle pools of these (shard, channel) queues (for a producer that pushed jobs
        some other way, or let a paused shard go), in one round trip."""
        with self.conn.pipeline(transaction=False) as pipe:
            self._ring(pipe, queues)
            pipe.execute()

    def _ring(self, pipe: redis.client.Pipeline, queues: Iterable[tuple[int, Channel]]) -> None:
        for shard, channel in queues:
            pipe.zadd(wake_key(self.space, shard, channel), {"1": 0})

    def claim(self, shard: int, channel: Channel, count: int, worker: str) -> list[Claim]:
        """Take up to ``count`` jobs in one round trip, recording them as started."""
        return self.claim_many([shard], channel, count, worker)

    def claim_many(self, shards: Iterable[int], channel: Channel, count: int, worker: str,
                   finished: Sequence[Claim] = ()) -> list[Claim]:
        """``claim`` on several shards' queues (up to ``count`` from each) in one script call;
        ``finished`` (a consumer's previous batch) are ``finish``ed first in the same round trip."""
        shards = list(shards)
        if not shards:
            if finished:
                self.finish(finished)
            return []
        execution = uuid.uuid4().hex
        keys = []
        for shard in shards:
            keys += [self.queue(shard, channel).key, self._started(shard, channel), pause_key(self.space, shard),
                     wake_key(self.space, shard, channel)]
        args: list[str | int] = [count, "rq:job:", utcformat(now()), worker, int(time.time()) + CLAIM_LEASE,
                                 execution]
        if not finished:
            answers = self._claim(keys=keys, args=args)
        else:  # EVALSHA by hand: redis-py would check a pipeline's scripts with SCRIPT EXISTS first (a round trip)
            with self.conn.pipeline(transaction=False) as pipe:
                self._finish_into(pipe, finished)
                pipe.evalsha(self._claim.sha, len(keys), *keys, *args)
                try:
                    answers = pipe.execute()[-1]
                except redis.exceptions.NoScriptError:  # a Redis that lost its scripts (restarted): load it
                    answers = self._claim(keys=keys, args=args)
        claims = []
        for shard, ids in zip(shards, answers, strict=True):
            for raw in ids or []:
                text = raw.decode() if isinstance(raw, bytes) else raw
                claims.append(Claim(text, message_of(text), shard, channel, execution))
        return claims

    def finish(self, claims: Iterable[Claim]) -> None:
        """The jobs are done (whatever their messages' outcomes): forget them, and ring the
        scheduler's doorbell for each (``<id>:<channel>`` on the shard's settle list: it retries,
        bounces or removes what the attempt left) unless its claim says ``settle=False`` (the
        entry is gone already: the scheduler would only find it missing), in one round trip."""
        with self.conn.pipeline(transaction=False) as pipe:
            self._finish_into(pipe, claims)
            pipe.execute()

    def _finish_into(self, pipe: redis.client.Pipeline, claims: Iterable[Claim]) -> None:
        tally: dict[tuple[int, Channel], int] = {}
        for claim in claims:
            tally[claim.shard, claim.channel] = tally.get((claim.shard, claim.channel), 0) + 1
            pipe.zrem(self._started(claim.shard, claim.channel), f"{claim.job_id}:{claim.execution}")
            pipe.delete(f"rq:job:{claim.job_id}")
            if claim.settle:
                pipe.rpush(self.settle_key(claim.shard), f"{claim.message_id}:{claim.channel}")
        self._tally(pipe, "out", tally)

    def _tally(self, pipe: redis.client.Pipeline, kind: str, counts: dict[tuple[int, Channel], int]) -> None:
        """Add to this minute's counters (``<prefix>:tally:<unix minute>``, field ``<kind>:<node>/s<N>:<channel>``)
        inside the caller's pipeline: one HINCRBY per shard and channel, not per job; ``shardmail
        status`` turns this minute's and the last into rates."""
        if not counts:
            return
        key = self.tally_key(int(time.time()) // 60)
        for (shard, channel), count in counts.items():
            pipe.hincrby(key, f"{kind}:{self.space.address(shard)}:{channel}", count)
        pipe.expire(key, TALLY_TTL)

    def tally_key(self, minute: int) -> str:
        return f"{self.prefix}:tally:{minute}"

    # -- the scheduler's structures ---------------------------------------------------------------
    def settle_key(self, shard: int) -> str:
        return self.space.key("settle", shard)

    def retry_key(self, shard: int) -> str:
        return self.space.key("retry", shard)

    def settled(self, shard: int, count: int) -> list[tuple[str, Channel]]:
        """Take up to ``count`` finished attempts from the shard's settle list."""
        raw = self.conn.lpop(self.settle_key(shard), count) or []
        return [_member(x) for x in raw]

    def schedule(self, shard: int, entries: Iterable[tuple[str, Channel, float]]) -> None:
        """Put (message, channel) into the shard's retry set at a time; an earlier time already
        there stands (ZADD LT). One round trip."""
        with self.conn.pipeline(transaction=False) as pipe:
            for message_id, channel, when in entries:
                pipe.zadd(self.retry_key(shard), {f"{message_id}:{channel}": when}, lt=True)
            pipe.execute()

    def pending_work(self, shards: Iterable[int], now: float) -> dict[int, tuple[int, int]]:
        """Per shard: (finished attempts waiting to be settled, retries due), in one round trip."""
        shards = list(shards)
        with self.conn.pipeline(transaction=False) as pipe:
            for shard in shards:
                pipe.llen(self.settle_key(shard))
                pipe.zcount(self.retry_key(shard), "-inf", now)
            answers = pipe.execute()
        return {shard: (answers[2 * i], answers[2 * i + 1]) for i, shard in enumerate(shards)}

    def due(self, shard: int, now: float, count: int) -> list[tuple[str, Channel]]:
        raw = self.conn.zrangebyscore(self.retry_key(shard), "-inf", now, start=0, num=count)
        return [_member(x) for x in raw]

    def release_due(self, shard: int, entries: list[tuple[str, Channel]]) -> None:
        """Due entries become jobs in their queues (then leave the retry set): one round trip. A
        crash between the two leaves a job and its entry; the entry only rings once more."""
        if not entries:
            return
        self.enqueue(Item(shard, message_id, channel, 0) for message_id, channel in entries)
        self.conn.zrem(self.retry_key(shard), *(f"{m}:{c}" for m, c in entries))

    def forget(self, shard: int, message_id: str, now: float) -> dict[Channel, tuple[bool, int]]:
        """An admin took the message out of the queue (hold, delete, requeue): drop its queued jobs,
        retry entries, failed jobs and abandoned claims, leaving a claim in flight. Per channel:
        (something was dropped, claim: 0 none, 1 in flight, 2 abandoned and cleared); one round trip."""
        with self.conn.pipeline(transaction=False) as pipe:
            for channel in CHANNELS:
                queue = self.queue(shard, channel)
                ident = job_id(self.space, message_id, channel)
                self._forget(keys=[queue.key, self._started(shard, channel), self._failed(shard, channel),
                                   f"rq:job:{ident}", self.retry_key(shard)],
                             args=[ident, f"{message_id}:{channel}", now], client=pipe)
            answers = pipe.execute()
        return {channel: (int(dropped) > 0, int(claim)) for channel, (dropped, claim) in zip(CHANNELS, answers,
                                                                                               strict=True)}

    def bring_forward(self, shard: int, now: float, count: int) -> list[tuple[str, Channel]]:
        """Up to ``count`` retry entries due later rescored to ``now`` (``flush``); returns them."""
        return [_member(m) for m in self._flush(keys=[self.retry_key(shard)], args=[repr(now), count])]

    def drop_queued(self, shard: int, channel: Channel, message_ids: list[str]) -> int:
        """Take these messages' jobs out of the queue list in one pass of the list per 5,000 ids (the
        rebalancer: messages no longer in the shard), with their hashes where they still name this
        queue; returns how many went."""
        queue = self.queue(shard, channel)
        job_ids = [job_id(self.space, m, channel) for m in message_ids]
        return sum(self._drop_queued(keys=[queue.key], args=[queue.name, *job_ids[start:start + 5000]])
                   for start in range(0, len(job_ids), 5000))

    def unschedule(self, shard: int, message_id: str) -> None:
        self.conn.zrem(self.retry_key(shard), *(f"{message_id}:{c}" for c in CHANNELS))

    def extend(self, claims: Iterable[Claim]) -> None:
        """Renew the lease of claims still being worked on (a remote pool holds messages for a slow
        destination longer than one lease), so neither rq's cleanup nor the sweep takes them for
        abandoned; one round trip."""
        expiry = int(time.time()) + CLAIM_LEASE
        with self.conn.pipeline(transaction=False) as pipe:
            for claim in claims:
                pipe.zadd(self._started(claim.shard, claim.channel), {f"{claim.job_id}:{claim.execution}": expiry},
                          xx=True)
            pipe.execute()

    def reclaim(self, shard: int, channel: Channel, worker: str) -> int:
        """Give back every claim recorded under ``worker``: a pool starting under a stable name
        takes back what its previous life (killed mid-batch) held. Returns how many."""
        entries = [_text(raw) for raw in self.conn.zrange(self._started(shard, channel), 0, -1)]
        if not entries:
            return 0
        with self.conn.pipeline(transaction=False) as pipe:
            for entry in entries:
                pipe.hget(f"rq:job:{entry.partition(':')[0]}", "worker_name")
            owners = pipe.execute()
        mine = []
        for entry, owner in zip(entries, owners, strict=True):
            if owner is not None and owner.decode() == worker:
                job, _, execution = entry.partition(":")
                mine.append(Claim(job, message_of(job), shard, channel, execution))
        if mine:
            self.release(mine)
        return len(mine)

    def release(self, claims: Iterable[Claim]) -> None:
        """Give claimed jobs back, at the head of their queues (a pool stopping before it could run
        them), in one round trip; their pools are woken."""
        queues: set[tuple[int, Channel]] = set()
        with self.conn.pipeline(transaction=False) as pipe:
            for claim in claims:
                queue = self.queue(claim.shard, claim.channel)
                pipe.zrem(self._started(claim.shard, claim.channel), f"{claim.job_id}:{claim.execution}")
                pipe.hset(f"rq:job:{claim.job_id}", "status", "queued")
                pipe.lpush(queue.key, claim.job_id)
                queues.add((claim.shard, claim.channel))
            self._ring(pipe, queues)
            pipe.execute()

    def fail(self, claim: Claim, why: str) -> None:
        """A job raised (a bug, not a delivery outcome): keep it in rq's failed registry for a human."""
        with self.conn.pipeline(transaction=False) as pipe:
            pipe.zrem(self._started(claim.shard, claim.channel), f"{claim.job_id}:{claim.execution}")
            pipe.hset(f"rq:job:{claim.job_id}", mapping={"status": "failed", "exc_info": why[:4000]})
            pipe.zadd(self._failed(claim.shard, claim.channel), {claim.job_id: time.time() + FAILURE_TTL})
            pipe.execute()

    def purge(self, shards: Iterable[int]) -> int:
        """Everything Redis holds for these shards of this namespace's node: queued, claimed and
        failed jobs with their hashes, the queues' registries, retry set, settle list, wake-up and
        pause keys, and its pools' records in rq's worker registry (``shardmail adopt``: the node
        is dead and its spool taken in elsewhere, where the sweep rebuilds its jobs under the new
        owner's names). Returns how many jobs went."""
        shards = list(shards)
        with self.conn.pipeline(transaction=False) as pipe:
            for shard in shards:
                for channel in CHANNELS:
                    pipe.lrange(self.queue(shard, channel).key, 0, -1)
                    pipe.zrange(self._started(shard, channel), 0, -1)
                    pipe.zrange(self._failed(shard, channel), 0, -1)
                    pipe.smembers(WORKERS_BY_QUEUE_KEY % self.queue(shard, channel).name)
            answers = iter(pipe.execute())
        gone = 0
        for shard in shards:
            for channel in CHANNELS:
                queue = self.queue(shard, channel)
                queued, started, failed, workers = next(answers), next(answers), next(answers), next(answers)
                idents = {_text(x) for x in queued} | {_text(x).partition(":")[0] for x in started}
                idents |= {_text(x) for x in failed}
                gone += len(idents)
                keys = [f"rq:job:{ident}" for ident in idents] + [_text(w) for w in workers]
                keys += [queue.key, self._started(shard, channel), self._failed(shard, channel),
                         wake_key(self.space, shard, channel), WORKERS_BY_QUEUE_KEY % queue.name]
                with self.conn.pipeline(transaction=False) as pipe:
                    for start in range(0, len(keys), 1000):
                        pipe.delete(*keys[start:start + 1000])
                    pipe.srem("rq:queues", queue.key)
                    if workers:
                        pipe.srem(REDIS_WORKER_KEYS, *workers)
                    pipe.execute()
            self.conn.delete(self.retry_key(shard), self.settle_key(shard), pause_key(self.space, shard))
        return gone

    # -- views: what ops and the sweep read -------------------------------------------------------------
    def queued(self, shard: int, channel: Channel) -> list[str]:
        """The messages whose jobs wait in the queue, in queue order."""
        return [message_of(_text(raw)) for raw in self.conn.lrange(self.queue(shard, channel).key, 0, -1)]

    def in_flight(self, shards: Iterable[int], now: float | None = None) -> set[str]:
        """Messages with an unexpired claim (being delivered right now) on these shards, one round trip."""
        now = time.time() if now is None else now
        with self.conn.pipeline(transaction=False) as pipe:
            for shard in shards:
                for channel in CHANNELS:
                    pipe.zrangebyscore(self._started(shard, channel), now, "+inf")
            answers = pipe.execute()
        return {message_of(_text(raw).partition(":")[0]) for members in answers for raw in members}

    def doorbells(self, shard: int, now: float | None = None) -> set[str]:
        """Every ``<id>:<channel>`` Redis knows for the shard, however it knows it: queued jobs,
        unexpired claims (one whose lease ran out belongs to a pool that is gone: it rings no bell),
        the retry set and the settle list; one round trip, read in that order (a job's own)."""
        now = time.time() if now is None else now
        with self.conn.pipeline(transaction=False) as pipe:
            for channel in CHANNELS:
                pipe.lrange(self.queue(shard, channel).key, 0, -1)
                pipe.zrangebyscore(self._started(shard, channel), now, "+inf")
            pipe.zrange(self.retry_key(shard), 0, -1)
            pipe.lrange(self.settle_key(shard), 0, -1)
            answers = pipe.execute()
        known: set[str] = set()
        for c, channel in enumerate(CHANNELS):
            known.update(f"{message_of(_text(raw))}:{channel}" for raw in answers[2 * c])
            known.update(f"{message_of(_text(raw).partition(':')[0])}:{channel}" for raw in answers[2 * c + 1])
        known.update(_text(x) for x in answers[-2])
        known.update(_text(x) for x in answers[-1])
        return known

    def census(self, shards: Iterable[int], now: float, activity: bool = True
               ) -> tuple[dict[int, ShardFigures], list[WorkerRecord]]:
        """Every queue figure of these shards and (``activity``) the per-minute tallies and the live
        workers serving this deployment's queues, in one round trip (``shardmail status``, the
        Prometheus scrape)."""
        shards = list(shards)
        minute = int(now) // 60
        with self.conn.pipeline(transaction=False) as pipe:
            for shard in shards:
                for channel in CHANNELS:
                    queue = self.queue(shard, channel)
                    pipe.llen(queue.key)
                    pipe.zcard(self._started(shard, channel))
                    pipe.zcard(self._failed(shard, channel))
                    pipe.lindex(queue.key, 0)
                pipe.zcard(self.retry_key(shard))
                pipe.zcount(self.retry_key(shard), "-inf", now)
                pipe.llen(self.settle_key(shard))
                pipe.exists(pause_key(self.space, shard))
            if activity:
                pipe.hgetall(self.tally_key(minute))
                pipe.hgetall(self.tally_key(minute - 1))
                pipe.eval(_WORKERS, 1, "rq:workers")
            answers = pipe.execute()
        tallies = ({_text(k): int(v) for k, v in answers[-3].items()},
                   {_text(k): int(v) for k, v in answers[-2].items()}) if activity else ({}, {})
        per_shard = 4 * len(CHANNELS) + 4
        figures = {}
        for index, shard in enumerate(shards):
            row = answers[index * per_shard : (index + 1) * per_shard]
            channels = {}
            for c, channel in enumerate(CHANNELS):
                ready, started, failed, head = row[4 * c : 4 * c + 4]
                field_name = f"{self.space.address(shard)}:{channel}"
                channels[channel] = QueueFigures(
                    ready, started, failed, message_of(_text(head)) if head else None,
                    (tallies[0].get(f"in:{field_name}", 0), tallies[1].get(f"in:{field_name}", 0)),
                    (tallies[0].get(f"out:{field_name}", 0), tallies[1].get(f"out:{field_name}", 0)))
            deferred, due, settling, paused = row[4 * len(CHANNELS):]
            figures[shard] = ShardFigures(channels, deferred, due, settling, bool(paused))
        return figures, self._workers(answers[-1]) if activity else []

    def _workers(self, raw: list) -> list[WorkerRecord]:
        records = []
        for i in range(0, len(raw) - 3, 4):
            served = [self._queue_re.fullmatch(q) for q in _text(raw[i + 1]).split(",")]
            queues = [(int(m.group(1)), m.group(2)) for m in served if m]
            if queues:  # else a worker of another deployment (or a stock rq worker on other queues)
                records.append(WorkerRecord(_text(raw[i]).removeprefix("rq:worker:"), queues, _text(raw[i + 2]),
                                            _text(raw[i + 3])))
        return records

    def announce(self, queues: Iterable[tuple[int, Channel]], name: str) -> Registration | None:
        """Register a pool in rq's worker registry (birth now, state busy; the caller sends
        heartbeats and the death), so ``rq info`` and rq-dashboard list it with its queues. None
        if Redis said no."""
        worker = Worker([self.queue(shard, channel) for shard, channel in queues], name=name, connection=self.conn,
                        serializer=JSONSerializer)
        try:
            try:
                worker.register_birth()
            except ValueError:  # our own name, left by a previous life of this pool that was killed
                worker.register_death()
                worker.register_birth()
            worker.set_state("busy")
        except (redis.RedisError, ValueError) as exc:
            log.warning("not registered as an rq worker: %s", exc)
            return None
        return Registration(worker)

    def depths(self, shards: Iterable[int]) -> dict[int, int]:
        """Ready jobs per shard (all channels), in one round trip."""
        shards = list(shards)
        with self.conn.pipeline(transaction=False) as pipe:
            for shard in shards:
                for channel in ("local", "remote"):
                    pipe.llen(self.queue(shard, channel).key)
            counts = pipe.execute()
        return {shard: counts[2 * i] + counts[2 * i + 1] for i, shard in enumerate(shards)}


class Waiter:
    """An idle pool's wait for work: blocks until a producer rings one of its queues' wake-up keys,
    for ``WAKE_TIMEOUT`` at most, on a connection of its own (a blocking pop must not hold a
    connection the pool's other threads share). The timeout stays below the client's socket
    timeout, so a long wait is never mistaken for a dead Redis."""

    def __init__(self, jobs: Jobs, timeout: float = WAKE_TIMEOUT) -> None:
        limit = socket_timeout(jobs.conn)
        self.timeout = min(timeout, limit / 2) if limit else timeout
        self.space = jobs.space
        self.conn = private_client(jobs.conn)

    def wait(self, queues: Iterable[tuple[int, Channel]]) -> bool:
        """Whether one was rung (False: the timeout passed); ``redis.RedisError`` if Redis is away."""
        keys = [wake_key(self.space, shard, channel) for shard, channel in queues]
        if not keys:  # no queues (yet): nothing can ring, but the caller must not spin
            time.sleep(self.timeout)
            return False
        return self.conn.bzpopmin(keys, self.timeout) is not None

    def close(self) -> None:
        self.conn.connection_pool.disconnect()
