"""Redis loses everything, or goes away for a while: the spool alone brings every message to its
recipients, once, with no operator action. Real redis-server (stopped and started), real scheduler
and remote pool processes, a real DNS server and an SMTP sink on loopback."""

from __future__ import annotations

import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable

from core.envelope import Envelope
from core.redis_conn import connect
from core.shards import Namespace
from core.submit import Draft, Submitter
from tests.conftest import Node, RedisServer
from tests.dns_server import DnsServer
from tests.smtp_peers import Sink
from tests.support import wait_until

BODY = b"From: <a@example.net>\r\nSubject: recovery\r\n\r\n" + b"some text for the body\r\n" * 40


def start(node: Node, *args: str) -> subprocess.Popen[bytes]:
    """A shardmail process of the node (stopped with it), its output in a log beside its var dir."""
    log = node.var_dir.parent / f"{args[0]}-{len(node.procs)}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "ops.cli", *args], env=node.env, stdout=out,
                                stderr=subprocess.STDOUT)
    node.procs.append(proc)
    return proc


def queue(node: Node, count: int, domain: str) -> list[Envelope]:
    settings = node.settings()
    submitter = Submitter(settings, connect(settings))
    accepted: list[Envelope] = []
    for first in range(0, count, 250):
        drafts = [Draft(submitter.new_id(), "a@example.net", [f"u{i}@{domain}"], BODY)
                  for i in range(first, min(first + 250, count))]
        results = submitter.accept_batch(drafts)
        assert all(isinstance(r, Envelope) for r in results)
        accepted.extend(results)  # type: ignore[arg-type]
    return accepted


def delivered_once(sink: Sink, count: int, domain: str) -> None:
    copies = Counter(r for t in sink.transactions for r in t.recipients)
    assert set(copies) == {f"u{i}@{domain}" for i in range(count)}
    assert max(copies.values()) == 1
    assert all(t.sender == "a@example.net" for t in sink.transactions)  # no bounce went anywhere


def test_redis_restarted_empty_with_10000_queued_delivers_all_once(
        node_factory: Callable[..., Node], own_redis: RedisServer, dns_server: DnsServer,
        sink_factory: Callable[..., Sink]) -> None:
    count = 10_000
    sink = sink_factory("127.0.1.41")
    node = node_factory(redis_url=own_redis.url, dnsresolvers=dns_server.hostport, concurrencydestination="20")
    queue(node, count, "d41.test")
    own_redis.stop()
    own_redis.start()  # no persistence: it comes back empty
    assert own_redis.client().dbsize() == 0
    start(node, "scheduler")
    start(node, "worker", "remote", "--name", "remote-0")
    wait_until(lambda: len(sink.transactions) >= count, timeout=240, interval=0.5, what="all delivered")
    wait_until(lambda: node.spooled() == [], timeout=30, interval=0.5, what="spool empty")
    delivered_once(sink, count, "d41.test")


def test_redis_away_for_30_seconds_mid_run_bounces_nothing(
        node_factory: Callable[..., Node], own_redis: RedisServer, dns_server: DnsServer,
        sink_factory: Callable[..., Sink]) -> None:
    count = 600
    sink = sink_factory("127.0.1.42", data_delay=0.02)
    node = node_factory(redis_url=own_redis.url, dnsresolvers=dns_server.hostport, concurrencydestination="2",
                        remoteactivelimit="20")  # most of the queue waits in Redis, not in the pool
    queue(node, count, "d42.test")
    start(node, "scheduler")
    start(node, "worker", "remote", "--name", "remote-0")
    wait_until(lambda: len(sink.transactions) >= 50, timeout=30, what="delivery under way")
    own_redis.stop()
    outage = time.monotonic() + 30
    while time.monotonic() < outage:  # the fault lasts 30 s; meanwhile the spool must keep everything
        assert len(node.spooled()) + len({r for t in sink.transactions for r in t.recipients}) >= count
        time.sleep(1)
    assert len(sink.transactions) < count  # some mail was still waiting for Redis
    own_redis.start()  # back, and empty
    wait_until(lambda: len(sink.transactions) >= count and node.spooled() == [], timeout=120, interval=0.5,
               what="everything delivered after Redis returned")
    delivered_once(sink, count, "d42.test")


def test_recover_command_rebuilds_redis_and_says_what_it_did(node_factory: Callable[..., Node],
                                                              own_redis: RedisServer) -> None:
    node = node_factory(redis_url=own_redis.url)
    accepted = queue(node, 300, "far.example")
    own_redis.client().flushall()
    result = node.command("recover")
    assert result.returncode == 0, result.stderr
    summary = result.stderr.decode().strip().splitlines()[-1]
    assert summary.startswith("recover: 300 messages in 2 shards read in ") and "300 queued again" in summary
    settings = node.settings()
    conn = own_redis.client()
    space = Namespace.of(settings)
    members = {m.decode() for s in range(settings.shards) for m in conn.zrange(space.key("retry", s), 0, -1)}
    assert members == {f"{e.id}:remote" for e in accepted}
    again = node.command("recover")
    assert "0 queued again, 300 already queued" in again.stderr.decode()
    own_redis.stop()
    down = node.command("recover")
    assert down.returncode == 75 and b"nothing changed" in down.stderr
