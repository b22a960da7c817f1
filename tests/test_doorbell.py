"""Idle pools wait on their queues' wake-up keys: quiet while idle, prompt when jobs come, every
process of a queue ramping up under load, and still there after Redis restarts."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence

import redis

from core.envelope import Channel
from core.jobs import WAKE_TIMEOUT, Claim, Item, Jobs, Waiter, wake_key
from core.shards import Namespace
from tests.conftest import Node, RedisServer
from tests.support import wait_until
from workers.consumer import Consumer
from workers.remote_pool import serve

PREFIX = "t"
SPACE = Namespace(PREFIX, "n1")
LONG_WAIT = 4.0  # s: a pick-up well under it was rung, not a timeout
PROMPT = 0.3  # s from a push to its claim, for an idle pool that was rung
WINDOW = 2.0  # s of idleness measured (the pools used to claim every 50 ms: 40 rounds)


def client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=1)


def blocked(conn: redis.Redis, count: int = 1) -> bool:
    try:
        return int(conn.info("clients")["blocked_clients"]) >= count
    except redis.RedisError:
        return False


def calls(conn: redis.Redis, *commands: str) -> int:
    stats = conn.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in commands)


def idle_rounds(conn: redis.Redis) -> tuple[int, int]:
    """Claim rounds (one claim script call each, whatever the shards) and blocking waits of
    whatever consumes ``conn``'s Redis over ``WINDOW`` seconds of nobody pushing anything."""
    conn.config_resetstat()
    time.sleep(WINDOW)  # the measurement window itself, not a wait for a condition
    return calls(conn, "evalsha", "eval"), calls(conn, "bzpopmin")


def ids(count: int, start: int = 0) -> list[str]:
    return [f"{i:026X}" for i in range(start, start + count)]


class Run:
    """A Consumer on a thread, recording when it got which job."""

    def __init__(self, jobs: Jobs, queues: Sequence[tuple[int, Channel]], name: str, batch: int = 100,
                 work: float = 0.0, wake_timeout: float = LONG_WAIT) -> None:
        self.got: list[tuple[float, str]] = []
        self.work = work
        self.stop = threading.Event()
        self.consumer = Consumer(jobs, queues, self.handle, batch=batch, name=name, wake_timeout=wake_timeout)
        self.thread = threading.Thread(target=self.consumer.run, args=(self.stop,), daemon=True)
        self.thread.start()

    def handle(self, claims: list[Claim]) -> list[Claim]:
        self.got.extend((time.monotonic(), c.message_id) for c in claims)
        if self.work:
            time.sleep(self.work)  # the batch's work
        return claims

    def join(self) -> float:
        """Stop it; how long that took."""
        started = time.monotonic()
        self.stop.set()
        self.thread.join(10)
        assert not self.thread.is_alive()
        return time.monotonic() - started


def test_every_push_rings_the_wake_key_of_its_own_queue(redis_url: str) -> None:
    conn = client(redis_url)
    jobs = Jobs(conn, SPACE)
    jobs.enqueue([Item(0, i, "local") for i in ids(3)] + [Item(1, i, "remote") for i in ids(2, 10)])
    jobs.enqueue([Item(0, i, "local") for i in ids(3, 20)])
    assert conn.zcard(wake_key(SPACE, 0, "local")) == 1  # one member, however often rung
    assert conn.zcard(wake_key(SPACE, 1, "remote")) == 1
    assert not conn.exists(wake_key(SPACE, 0, "remote"), wake_key(SPACE, 1, "local"))

    conn.delete(wake_key(SPACE, 0, "local"))
    claims = jobs.claim(0, "local", 4, "w")
    assert len(claims) == 4 and conn.exists(wake_key(SPACE, 0, "local"))  # 2 left: another pool may take them
    conn.delete(wake_key(SPACE, 0, "local"))
    claims += jobs.claim(0, "local", 4, "w")
    assert len(claims) == 6 and not conn.exists(wake_key(SPACE, 0, "local"))  # took the rest: nobody to wake
    jobs.release(claims[:1])
    assert conn.exists(wake_key(SPACE, 0, "local"))
    conn.delete(wake_key(SPACE, 1, "remote"))
    jobs.wake([(1, "remote")])
    assert conn.exists(wake_key(SPACE, 1, "remote"))


def test_a_waiter_hears_only_its_own_queues(redis_url: str) -> None:
    conn = client(redis_url)
    jobs = Jobs(conn, SPACE)
    waiter = Waiter(jobs, 0.2)
    try:
        jobs.enqueue([Item(1, ids(1)[0], "local")])  # rung before the wait: the wait returns at once
        started = time.monotonic()
        assert waiter.wait([(0, "local"), (1, "local")])
        assert time.monotonic() - started < 0.1
        jobs.enqueue([Item(1, ids(1, 5)[0], "local")])
        started = time.monotonic()
        assert not waiter.wait([(0, "local"), (0, "remote")])  # another shard's ring is not ours
        assert time.monotonic() - started >= 0.15
        assert conn.exists(wake_key(SPACE, 1, "local"))  # and is left for a pool of that shard
    finally:
        waiter.close()


def test_the_wait_stays_below_the_socket_timeout_on_a_connection_of_its_own(redis_url: str) -> None:
    conn = redis.Redis.from_url(redis_url, socket_timeout=1.0)
    clients = int(conn.info("clients")["connected_clients"])
    waiter = Waiter(Jobs(conn, SPACE), WAKE_TIMEOUT)
    assert waiter.timeout == 0.5
    assert not waiter.wait([(0, "local")])  # no socket timeout on the way
    assert int(conn.info("clients")["connected_clients"]) == clients + 1
    waiter.close()
    wait_until(lambda: int(conn.info("clients")["connected_clients"]) == clients, what="connection closed")


def test_an_idle_consumer_blocks_and_a_push_wakes_it_at_once(redis_url: str) -> None:
    conn = client(redis_url)
    run = Run(Jobs(conn, SPACE), [(0, "local"), (1, "local")], "idle", wake_timeout=WAKE_TIMEOUT)
    try:
        wait_until(lambda: blocked(conn), what="consumer waiting")
        rounds, waits = idle_rounds(conn)
        assert rounds <= WINDOW / WAKE_TIMEOUT + 2, rounds
        assert 1 <= waits <= WINDOW / WAKE_TIMEOUT + 2, waits
    finally:
        run.join()

    run = Run(Jobs(conn, SPACE), [(0, "local"), (1, "local")], "prompt")
    try:
        for n, message_id in enumerate(ids(3)):
            wait_until(lambda: blocked(conn), what="consumer waiting")
            pushed = time.monotonic()
            Jobs(conn, SPACE).enqueue([Item(n % 2, message_id, "local")])
            wait_until(lambda n=n: len(run.got) > n, timeout=LONG_WAIT + 2, what="job claimed")
            assert run.got[n][1] == message_id
            assert run.got[n][0] - pushed < PROMPT, run.got[n][0] - pushed
    finally:
        assert run.join() < LONG_WAIT + 1  # a stop is seen when the wait times out, at the latest


def test_two_consumers_of_one_queue_both_take_work_under_load(redis_url: str) -> None:
    """One ring wakes one of them; the first claim leaves jobs behind and rings again for the other.
    Alone, the first would take all 300 (30 batches of 10 ms) before the second's wait timed out."""
    conn = client(redis_url)
    runs = [Run(Jobs(conn, SPACE), [(0, "local")], f"c{i}", batch=10, work=0.01) for i in range(2)]
    try:
        wait_until(lambda: blocked(conn, 2), what="both consumers waiting")
        pushed = time.monotonic()
        Jobs(conn, SPACE).enqueue([Item(0, i, "local") for i in ids(300)])
        wait_until(lambda: sum(len(r.got) for r in runs) == 300, timeout=20, what="all claimed")
        assert sorted(m for r in runs for _, m in r.got) == ids(300)  # each once
        for run in runs:
            assert run.got, "a consumer got nothing"
            assert run.got[0][0] - pushed < PROMPT + 0.1, run.got[0][0] - pushed
    finally:
        for run in runs:
            run.join()


def test_drain_does_not_wait(redis_url: str) -> None:
    conn = client(redis_url)
    jobs = Jobs(conn, SPACE)
    consumer = Consumer(jobs, [(0, "local")], lambda claims: claims, name="drain")
    started = time.monotonic()
    assert consumer.drain() == 0
    jobs.enqueue([Item(0, i, "local") for i in ids(5)])
    assert consumer.drain() == 5
    assert time.monotonic() - started < 0.5


def test_a_consumer_waiting_through_a_redis_restart_goes_on(own_redis: RedisServer) -> None:
    conn = client(own_redis.url)
    run = Run(Jobs(conn, SPACE), [(0, "local")], "restart", wake_timeout=WAKE_TIMEOUT)
    try:
        wait_until(lambda: blocked(conn), what="consumer waiting")
        own_redis.stop()
        own_redis.start()  # empty: no persistence
        wait_until(lambda: blocked(conn), timeout=15, what="consumer waiting again")
        Jobs(conn, SPACE).enqueue([Item(0, ids(1)[0], "local")])
        wait_until(lambda: run.got, timeout=LONG_WAIT, what="job claimed after the restart")
        assert run.thread.is_alive()
    finally:
        run.join()


class RemotePool:
    """``workers.remote_pool.serve`` on a thread with its own event loop."""

    def __init__(self, node: Node, wake_timeout: float) -> None:
        self.settings = node.settings()
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(wake_timeout,), daemon=True)
        self.thread.start()
        assert self.ready.wait(10)

    def _run(self, wake_timeout: float) -> None:
        async def main() -> None:
            self.stop_event = asyncio.Event()
            self.ready.set()
            await serve(self.settings, None, self.stop_event, name="remote-test", wake_timeout=wake_timeout)

        self.loop.run_until_complete(main())
        self.loop.close()

    def join(self) -> float:
        started = time.monotonic()
        self.loop.call_soon_threadsafe(self.stop_event.set)
        self.thread.join(20)
        assert not self.thread.is_alive()
        return time.monotonic() - started


def _claimed(conn: redis.Redis, jobs: Jobs, shard: int) -> Callable[[], bool]:
    """The remote job is gone from its queue (the pool took it: the message is not in the spool,
    so the job is finished at once)."""
    return lambda: jobs.queue(shard, "remote").count == 0


def test_an_idle_remote_pool_blocks_and_a_push_wakes_it_at_once(node_factory: Callable[..., Node]) -> None:
    node = node_factory(dnsresolvers="127.0.0.1:9")  # nothing is resolved: the jobs' messages are not spooled
    pool = RemotePool(node, WAKE_TIMEOUT)
    conn = client(node.env["SHARDMAIL_REDIS_URL"])
    jobs = Jobs(conn, Namespace.of(pool.settings))
    try:
        wait_until(lambda: blocked(conn), what="remote pool waiting")
        rounds, waits = idle_rounds(conn)
        assert rounds <= WINDOW / WAKE_TIMEOUT + 2, rounds
        assert 1 <= waits <= WINDOW / WAKE_TIMEOUT + 2, waits
        for n, message_id in enumerate(ids(3)):
            wait_until(lambda: blocked(conn), what="remote pool waiting")
            pushed = time.monotonic()
            jobs.enqueue([Item(n % 2, message_id, "remote")])
            wait_until(_claimed(conn, jobs, n % 2), timeout=LONG_WAIT, interval=0.005, what="job claimed")
            assert time.monotonic() - pushed < PROMPT, time.monotonic() - pushed
        wait_until(lambda: conn.llen(jobs.settle_key(0)) + conn.llen(jobs.settle_key(1)) == 3,
                   what="jobs finished")
        wait_until(lambda: blocked(conn), what="remote pool waiting")
    finally:
        assert pool.join() < WAKE_TIMEOUT / 2  # a stop does not wait for the blocking pop


def test_a_remote_pool_waiting_through_a_redis_restart_goes_on(node_factory: Callable[..., Node],
                                                               own_redis: RedisServer) -> None:
    node = node_factory(redis_url=own_redis.url, dnsresolvers="127.0.0.1:9")
    pool = RemotePool(node, WAKE_TIMEOUT)
    conn = client(own_redis.url)
    jobs = Jobs(conn, Namespace.of(pool.settings))
    try:
        wait_until(lambda: blocked(conn), what="remote pool waiting")
        own_redis.stop()
        own_redis.start()
        wait_until(lambda: blocked(conn), timeout=15, what="remote pool waiting again")
        jobs.enqueue([Item(0, ids(1)[0], "remote")])
        wait_until(_claimed(conn, jobs, 0), timeout=LONG_WAIT, what="job claimed after the restart")
        assert pool.thread.is_alive()
    finally:
        pool.join()
