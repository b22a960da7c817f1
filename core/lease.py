"""The per-shard lease: which scheduler (or, while it moves mail, which rebalancer) leads a shard.

Interface: ``LEASE_MS``, ``lease_key(space, shard)``; ``Leases(conn, space, name, shards)`` with
``renew()``, ``held()``, ``give_up(shards)`` (the scheduler's side); ``acquire(conn, space, shard,
name, timeout) -> bool`` (the rebalancer's: wait until the scheduler hands the shard over). ``space``
is core.shards' ``Namespace``: a node's schedulers lease only that node's shards.

A shard is led by whoever holds ``<prefix>:lease:<node>/s<N>``: SET NX with a ``LEASE_MS`` expiry,
renewed on every scheduler pass by a script that renews only a lease still held, so a holder that
dies or stalls loses it within ``LEASE_MS`` and another takes over. While the shard's pause key
exists (core.jobs' ``pause_key``, set by the rebalancer), a scheduler gives its lease up instead of
renewing it, and the rebalancer takes it (``acquire``) so that no settle, release or sweep runs
on the shard while its files move; giving the pause and the lease back lets a scheduler take the
lease afresh, and with it sweep the shard.

Failures: ``redis.RedisError`` propagates (a scheduler then skips its pass; the rebalancer stops,
consistent so far). Settings: ``redis_prefix``, ``node`` (via the namespace passed in).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import redis

from core.jobs import pause_key
from core.shards import Namespace

LEASE_MS = 15_000
ACQUIRE_STEP = 0.1  # s between two tries of ``acquire``
_RENEW = """
if redis.call('EXISTS', KEYS[2]) == 1 then
  if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
  return 0
end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) and 2 or 0
"""


def lease_key(space: Namespace, shard: int) -> str:
    return space.key("lease", shard)


class Leases:
    """Which shards this scheduler leads, renewed (or taken) in one round trip per pass."""

    def __init__(self, conn: redis.Redis, space: Namespace, name: str, shards: Callable[[], Sequence[int]]) -> None:
        self.conn = conn
        self.space = space
        self.name = name
        self.shards = shards  # asked on every pass: shards added online are led from the next one
        self._renew = conn.register_script(_RENEW)

    def key(self, shard: int) -> str:
        return lease_key(self.space, shard)

    def held(self) -> list[int]:
        return [shard for shard, fresh in self.renew() if fresh is not None]

    def renew(self) -> list[tuple[int, bool | None]]:
        """Per shard: None (another leads it), False (still ours) or True (just taken: a new
        lead, or ours again after Redis forgot everything)."""
        shards = list(self.shards())
        with self.conn.pipeline(transaction=False) as pipe:
            for shard in shards:
                self._renew(keys=[self.key(shard), pause_key(self.space, shard)], args=[self.name, LEASE_MS],
                            client=pipe)
            answers = pipe.execute()
        return [(shard, None if not answer else answer == 2) for shard, answer in zip(shards, answers, strict=True)]

    def give_up(self, shards: list[int]) -> None:
        for shard in shards:
            if self.conn.get(self.key(shard)) == self.name.encode():
                self.conn.delete(self.key(shard))


def acquire(conn: redis.Redis, space: Namespace, shard: int, name: str, timeout: float) -> bool:
    """Take the shard's lease under ``name`` (or find it ours already), waiting up to ``timeout``
    seconds for its holder to give it up (a scheduler does on its next pass once the pause key is
    set); False if it did not."""
    key = lease_key(space, shard)
    deadline = time.monotonic() + timeout
    while not conn.set(key, name, nx=True, px=LEASE_MS):
        if conn.get(key) == name.encode():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(ACQUIRE_STEP)
    return True
