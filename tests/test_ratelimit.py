"""core.ratelimit against a real redis-server: limits, the window rolling on, sharing, expiry, outages."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import redis
import redis.asyncio

from core.config import Settings, load
from core.ratelimit import AsyncRateLimiter, RateLimiter, client_key
from tests.conftest import RedisServer
from tests.support import wait_until

PREFIX = "rltest"


def settings(ip: int = 0, sender: int = 0, window: int = 60) -> Settings:
    return load(env={"SHARDMAIL_ME": "mx.test", "SHARDMAIL_RATELIMITIP": str(ip),
                     "SHARDMAIL_RATELIMITSENDER": str(sender), "SHARDMAIL_RATELIMITWINDOW": str(window)})


def connect(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)


def test_the_limit_is_reached_per_key_and_kind(redis_url: str) -> None:
    limiter = RateLimiter(connect(redis_url), PREFIX, settings(ip=3, sender=2))
    assert [limiter.allow("ip", "192.0.2.1") for _ in range(5)] == [True, True, True, False, False]
    assert limiter.allow("ip", "192.0.2.2")  # another client
    assert [limiter.allow("sender", "Alice@Example.com") for _ in range(2)] == [True, True]
    assert not limiter.allow("sender", "alice@example.COM")  # the same user, whatever the case
    assert limiter.allow("sender", "bob@example.com")
    assert limiter.allow("sender", "192.0.2.1")  # kinds are counted apart


def test_cost_counts_several_at_once_and_must_fit_whole(redis_url: str) -> None:
    limiter = RateLimiter(connect(redis_url), PREFIX, settings(ip=10))
    assert limiter.allow("ip", "192.0.2.1", cost=7)
    assert not limiter.allow("ip", "192.0.2.1", cost=4)  # refused whole, nothing counted
    assert limiter.allow("ip", "192.0.2.1", cost=3)
    assert not limiter.allow("ip", "192.0.2.1")
    assert not limiter.allow("ip", "192.0.2.9", cost=11)
    with pytest.raises(ValueError, match="cost"):
        limiter.allow("ip", "192.0.2.1", cost=0)
    with pytest.raises(ValueError, match="kind"):
        limiter.allow("helo", "x")


def test_ipv6_counts_by_slash_64_and_mapped_ipv4_as_ipv4(redis_url: str) -> None:
    assert client_key("2001:DB8::1") == client_key("2001:db8::ffff:1") == "2001:db8::/64"
    assert client_key("2001:db8:0:1::1") == "2001:db8:0:1::/64"
    assert client_key("::ffff:192.0.2.1") == "192.0.2.1" == client_key("192.0.2.1")
    limiter = RateLimiter(connect(redis_url), PREFIX, settings(ip=2))
    assert limiter.allow("ip", "2001:db8::1") and limiter.allow("ip", "2001:db8::2")
    assert not limiter.allow("ip", "2001:db8::3")
    assert limiter.allow("ip", "2001:db8:0:1::1")


def test_the_window_rolls_on_and_refusals_cost_nothing(redis_url: str) -> None:
    limiter = RateLimiter(connect(redis_url), PREFIX, settings(ip=4, window=1))  # one more every 0.25 s
    assert all(limiter.allow("ip", "192.0.2.1") for _ in range(4))
    full = time.monotonic()
    assert not limiter.allow("ip", "192.0.2.1")
    wait_until(lambda: limiter.allow("ip", "192.0.2.1"), timeout=2, what="a slot after 0.25 s", interval=0.01)
    elapsed = time.monotonic() - full
    assert 0.2 <= elapsed < 1.0, elapsed  # the dozens of refused polls did not push it back
    assert not limiter.allow("ip", "192.0.2.1")  # one slot, not a fresh window


def test_keys_expire_by_themselves(redis_url: str) -> None:
    conn = connect(redis_url)
    limiter = RateLimiter(conn, PREFIX, settings(sender=10, window=1))
    assert limiter.allow("sender", "a@example.com", cost=5)
    key = f"{PREFIX}:ratelimit:sender:a@example.com"
    assert 400 <= conn.pttl(key) <= 500  # the bucket empties in 5 x 0.1 s
    wait_until(lambda: not conn.exists(key), timeout=3, what="the key expiring")
    assert conn.keys(f"{PREFIX}:*") == []


def test_two_processes_share_one_count(redis_url: str) -> None:
    here = RateLimiter(connect(redis_url), PREFIX, settings(ip=5))
    other = RateLimiter(connect(redis_url), PREFIX, settings(ip=5))  # a second connection pool
    assert here.allow("ip", "192.0.2.7") and other.allow("ip", "192.0.2.7")
    program = textwrap.dedent(f"""
        import redis
        from core.config import load
        from core.ratelimit import RateLimiter
        limiter = RateLimiter(redis.Redis.from_url({redis_url!r}), {PREFIX!r},
                              load(env={{"SHARDMAIL_ME": "mx", "SHARDMAIL_RATELIMITIP": "5",
                                        "SHARDMAIL_RATELIMITWINDOW": "60"}}))
        print(" ".join(str(limiter.allow("ip", "192.0.2.7")) for _ in range(4)))
    """)
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60, check=True,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.stdout.split() == ["True", "True", "True", "False"]
    assert not here.allow("ip", "192.0.2.7") and not other.allow("ip", "192.0.2.7")


def test_concurrent_checks_never_exceed_the_limit(redis_url: str) -> None:
    async def main() -> list[bool]:
        conns = [redis.asyncio.Redis.from_url(redis_url) for _ in range(4)]
        limiters = [AsyncRateLimiter(c, PREFIX, settings(sender=25)) for c in conns]
        try:
            return await asyncio.gather(*(limiters[n % 4].allow("sender", "x@example.com") for n in range(100)))
        finally:
            for c in conns:
                await c.aclose()

    assert sum(asyncio.run(main())) == 25


def test_zero_means_off_and_asks_no_redis() -> None:
    dead = redis.Redis(unix_socket_path="/nonexistent/redis.sock", socket_connect_timeout=0.2)
    limiter = RateLimiter(dead, PREFIX, settings(ip=0, sender=0))
    assert all(limiter.allow("ip", "192.0.2.1") for _ in range(1000))
    assert limiter.allow("sender", "a@example.com")
    with pytest.raises(redis.RedisError):
        RateLimiter(dead, PREFIX, settings(ip=1)).allow("ip", "192.0.2.1")


def test_redis_stopped_raises_then_recovers(own_redis: RedisServer) -> None:
    limiter = RateLimiter(connect(own_redis.url), PREFIX, settings(ip=2))
    assert limiter.allow("ip", "192.0.2.1")
    own_redis.stop()
    start = time.monotonic()
    with pytest.raises(redis.RedisError):
        limiter.allow("ip", "192.0.2.1")
    assert time.monotonic() - start < 3  # an error soon, no hang
    own_redis.start()  # a fresh server: no script cached, no count kept
    assert [limiter.allow("ip", "192.0.2.1") for _ in range(3)] == [True, True, False]


def test_async_limiter_fails_every_waiter_while_redis_is_down_and_reloads_its_script(own_redis: RedisServer) -> None:
    async def main() -> None:
        conn = redis.asyncio.Redis.from_url(own_redis.url, socket_connect_timeout=1, socket_timeout=1)
        limiter = AsyncRateLimiter(conn, PREFIX, settings(ip=3))
        try:
            assert await asyncio.gather(*(limiter.allow("ip", "192.0.2.1") for _ in range(5))) == [
                True, True, True, False, False]
            own_redis.stop()
            outcomes = await asyncio.gather(*(limiter.allow("ip", "192.0.2.2") for _ in range(10)),
                                            return_exceptions=True)
            assert all(isinstance(o, redis.RedisError) for o in outcomes), outcomes
            own_redis.start()  # no script cached there: the limiter loads it again
            assert await asyncio.gather(*(limiter.allow("ip", "192.0.2.1") for _ in range(4))) == [
                True, True, True, False]
        finally:
            await conn.aclose()

    asyncio.run(main())
