"""Message rate limits per client address and per authenticated sender, shared through Redis.

Interface: ``RateLimiter(conn, prefix, settings)`` (a ``redis.Redis``) and ``AsyncRateLimiter(conn,
prefix, settings)`` (a ``redis.asyncio.Redis``, for the SMTP event loop: no thread hop), each with
``allow(kind, key, cost=1) -> bool`` (awaitable for the async one); ``kind`` is ``"ip"`` (``key``:
the client address) or ``"sender"`` (``key``: the authenticated user); ``client_key(address)``;
``KINDS``.

Why this shape: every ingress process on every node must see one count, so the count lives in
Redis; one script call (EVALSHA) per check is one round trip, and the script both decides and
counts, so two processes cannot both take the last slot. The algorithm is GCRA (a leaky bucket
kept as one timestamp per key): a client may send ``limit`` messages at once, then one more every
``window / limit`` seconds, so ``limit`` per ``window`` in the long run (a first window may see up
to twice that: the burst, then the refill; a fixed window lets as much through around its
boundary). Unlike a fixed window, a client that used its burst gets a steady trickle rather than
nothing until the window turns. The clock is Redis's (``TIME``), so the processes' clocks do not
matter; their settings must agree (the stored timestamp is read with the reader's limit). A
refused attempt costs nothing, so a client that keeps trying is not pushed further back. Each key
expires when its bucket is empty: nothing to clean up.

Keys: ``<prefix>:ratelimit:<kind>:<key>``, without a node name on purpose: a limit holds for the
whole cluster, however many nodes a client spreads its connections over. An IPv6 client counts by
its /64 (one host often holds a whole /64), an IPv4-mapped address as the IPv4 address; senders
ignore case.

Failures: a Redis error (down, slow: ``core.redis_conn`` timeouts) is raised as ``redis.RedisError``;
the caller answers ``451 4.7.0`` (temporary), never lets the message through unchecked nor refuses
it for good. A limit of 0 never asks Redis at all.

Settings: ``ratelimitip``, ``ratelimitsender``, ``ratelimitwindow``.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
from dataclasses import dataclass

import redis
import redis.asyncio

from core.config import Settings

KINDS = ("ip", "sender")
IPV6_PREFIX = 64

# KEYS[1]: the bucket; ARGV: microseconds per message, window in microseconds, cost.
# Returns 1 (allowed, counted) or 0 (refused, nothing changed).
SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local new = tat + tonumber(ARGV[1]) * tonumber(ARGV[3])
if new - now > tonumber(ARGV[2]) then return 0 end
redis.call('SET', KEYS[1], string.format('%.17g', new), 'PX', math.max(1, math.ceil((new - now) / 1000)))
return 1
"""


@dataclass(frozen=True, slots=True)
class Limit:
    count: int  # messages per window; 0 = no limit
    window: int  # seconds


def client_key(address: str) -> str:
    """What one client's count is kept under: the IPv4 address, or the IPv6 /64."""
    try:
        ip = ipaddress.ip_address(address.partition("%")[0])
    except ValueError:
        return address.lower()
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, IPV6_PREFIX), strict=False))
    return str(ip)


class _Limits:
    def __init__(self, prefix: str, settings: Settings) -> None:
        self.prefix = prefix
        self.limits = {"ip": Limit(settings.ratelimitip, settings.ratelimitwindow),
                       "sender": Limit(settings.ratelimitsender, settings.ratelimitwindow)}

    def _call(self, kind: str, key: str, cost: int) -> tuple[list[str], list[float]] | None:
        """The script's keys and arguments, or None when this kind has no limit."""
        try:
            limit = self.limits[kind]
        except KeyError:
            raise ValueError(f"unknown rate limit kind {kind!r} (not one of {', '.join(KINDS)})") from None
        if cost < 1:
            raise ValueError(f"rate limit cost must be >= 1, not {cost}")
        if not limit.count:
            return None
        name = client_key(key) if kind == "ip" else key.lower()
        window = limit.window * 1_000_000
        return [f"{self.prefix}:ratelimit:{kind}:{name}"], [window / limit.count, window, cost]


class RateLimiter(_Limits):
    """For synchronous callers (a thread, a command)."""

    def __init__(self, conn: redis.Redis, prefix: str, settings: Settings) -> None:
        super().__init__(prefix, settings)
        self._script = conn.register_script(SCRIPT)

    def allow(self, kind: str, key: str, cost: int = 1) -> bool:
        """Whether ``cost`` more messages fit (and if so they are counted); raises redis.RedisError."""
        call = self._call(kind, key, cost)
        return call is None or self._script(keys=call[0], args=call[1]) == 1


class AsyncRateLimiter(_Limits):
    """For the SMTP event loop: the checks of all sessions waiting at once go in one pipeline.

    Why: redis.asyncio costs about 100 us of CPU per command here, a pipeline of ten about 40 per
    command; a check asked while another batch is in flight waits for it and goes in the next one
    (group commit, as the spool does), so one limiter has one round trip in flight at a time.
    """

    def __init__(self, conn: redis.asyncio.Redis, prefix: str, settings: Settings) -> None:
        super().__init__(prefix, settings)
        self.conn = conn
        self._sha = hashlib.sha1(SCRIPT.encode()).hexdigest()
        self._waiting: list[tuple[list[str], list[float], asyncio.Future[bool]]] = []
        self._sender: asyncio.Task[None] | None = None

    async def allow(self, kind: str, key: str, cost: int = 1) -> bool:
        call = self._call(kind, key, cost)
        if call is None:
            return True
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiting.append((call[0], call[1], future))
        if self._sender is None:
            self._sender = asyncio.create_task(self._send())
        return await future

    async def _send(self) -> None:
        try:
            while self._waiting:
                batch, self._waiting = self._waiting, []
                try:
                    results = await self._run(batch)
                except Exception as exc:  # every waiter gets the error (a redis.RedisError: the caller's 4xx)
                    for _, _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, _, future), result in zip(batch, results, strict=True):
                    if not future.done():
                        future.set_result(result == 1)
        finally:
            self._sender = None

    async def _run(self, batch: list[tuple[list[str], list[float], asyncio.Future[bool]]]) -> list[object]:
        results = await self._pipeline(batch)
        missing = [n for n, result in enumerate(results) if isinstance(result, redis.exceptions.NoScriptError)]
        if missing:  # a restarted or flushed Redis: load the script, send those again
            await self.conn.script_load(SCRIPT)
            for n, result in zip(missing, await self._pipeline([batch[n] for n in missing]), strict=True):
                results[n] = result
        for result in results:
            if isinstance(result, Exception):
                raise result
        return results

    async def _pipeline(self, batch: list[tuple[list[str], list[float], asyncio.Future[bool]]]) -> list[object]:
        pipe = self.conn.pipeline(transaction=False)
        for keys, args, _ in batch:
            pipe.evalsha(self._sha, len(keys), *keys, *args)
        return list(await pipe.execute(raise_on_error=False))
