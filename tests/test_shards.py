"""Shard administration against real queued mail: random placement (spread over the open shards, never a
draining one), drain under load, a shard added online, a rebalance SIGKILLed mid-way and run again (counts
kept, each message delivered exactly once), and the pause that keeps consumers and the scheduler off a
shard being rebalanced. Real redis-server, shardmail processes,
unbound for MX records and an SMTP sink on loopback."""

from __future__ import annotations

import itertools
import json
import os
import signal
import smtplib
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable

import pytest
import redis

from core.envelope import id_time
from core.jobs import Jobs, pause_key
from core.lease import Leases, lease_key
from core.redis_conn import connect
from core.shards import Namespace, ShardMap
from tests.conftest import Node, _connectable
from tests.dns_server import DnsServer
from tests.smtp_peers import Sink
from tests.support import wait_until
from tests.test_recovery import delivered_once, queue, start


def where(node: Node) -> dict[str, list[int]]:
    """Every spooled message id -> the shards whose spool holds it."""
    shard_map = ShardMap(node.settings())
    found: dict[str, list[int]] = {}
    for shard in shard_map.ids(fresh=True):
        for message_id in shard_map.spool(shard).ids():
            found.setdefault(message_id, []).append(shard)
    return found


def shards_command(node: Node, *args: str, **env: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "ops.cli", "shards", *args], env=dict(node.env, **env),
                          capture_output=True, timeout=120)


def old_enough(ids: list[str]) -> None:
    """The rebalancer leaves messages younger than 2 s alone (their enqueue may be under way)."""
    newest = max(id_time(m) for m in ids)
    wait_until(lambda: time.time() > newest + 2.2, timeout=10, what="the queue older than 2 s")


def start_smtpd(node: Node) -> None:
    """An SMTP process logging to a file (a pipe nobody reads would fill up under load)."""
    proc = start(node, "smtpd")
    wait_until(lambda: proc.poll() is not None or _connectable(node.port), timeout=20, what="smtpd listening")
    assert proc.poll() is None


def maildir_copies(node: Node) -> Counter[str]:
    new = node.var_dir / "mail" / "catchall" / "new"
    return Counter(name.split(".")[1] for name in os.listdir(new)) if new.exists() else Counter()


def test_list_drain_open_add(node_factory: Callable[..., Node]) -> None:
    node = node_factory(shards="2")
    listing = node.command("shards", "list")
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.decode().splitlines()
    assert lines[0].split()[:5] == ["shard", "state", "spooled", "queued", "deferred"]
    assert [line.split()[:2] for line in lines[1:]] == [["0", "open"], ["1", "open"]]
    drained = node.command("shards", "drain", "1")
    assert drained.returncode == 0 and b"shard 1 is now draining" in drained.stdout
    assert b"was already draining" in node.command("shards", "drain", "1").stdout
    assert (node.var_dir / "spool" / "s1" / "draining").exists()  # durable: no Redis restart reopens it
    assert node.command("shards", "list").stdout.decode().splitlines()[2].split()[1] == "draining"
    assert b"shard 1 is now open" in node.command("shards", "open", "1").stdout
    added = node.command("shards", "add")
    assert added.returncode == 0 and b"shard 2 added" in added.stdout, added.stderr
    assert [line.split()[0] for line in node.command("shards", "list").stdout.decode().splitlines()[1:]] == \
        ["0", "1", "2"]
    assert node.command("shards", "drain", "7").returncode == 64
    assert node.command("shards", "rebalance", "--from", "0").returncode == 64
    assert node.command("shards", "rebalance", "--from", "0", "--to", "0").returncode == 64


def test_drain_under_load_stops_new_mail_and_the_shard_empties(node_factory: Callable[..., Node]) -> None:
    node = node_factory(shards="2")
    start_smtpd(node)
    accepted: list[tuple[float, str]] = []  # (when the 250 came, queue id)
    stop = threading.Event()
    failures: list[str] = []

    def send() -> None:
        with smtplib.SMTP("127.0.0.1", node.port, timeout=30) as client:
            client.ehlo("load.example.net")
            for i in range(2000):
                if stop.is_set():
                    return
                client.mail("load@example.net")
                client.rcpt(f"user{i}@test.example")
                code, text = client.data(b"Subject: load\r\n\r\nbody\r\n")
                if code != 250:
                    failures.append(f"{code} {text!r}")
                    return
                accepted.append((time.time(), text.decode().rsplit(" ", 1)[-1]))

    sender = threading.Thread(target=send)
    sender.start()
    try:
        wait_until(lambda: len(accepted) >= 100 or failures, timeout=30, what="mail flowing")
        assert node.command("shards", "drain", "1").returncode == 0
        drained_at = time.time()
        wait_until(lambda: accepted and accepted[-1][0] > drained_at + 1.5 and len(accepted) >= 300, timeout=60,
                   what="mail after the drain")
    finally:
        stop.set()
        sender.join(60)
    assert not failures
    spooled = where(node)
    before = [m for t, m in accepted if t < drained_at]
    after = [m for t, m in accepted if t > drained_at + 1.1]  # ingress looks at the markers once a second
    assert after and all(spooled[m] == [0] for m in after)
    assert any(spooled[m] == [1] for m in before)  # the shard had mail when it was drained
    start(node, "worker", "local")  # its workers finish it
    wait_until(lambda: not any(s == [1] for s in where(node).values()), timeout=60, what="shard 1 empty")
    wait_until(lambda: not where(node), timeout=60, what="everything delivered")
    assert sum(maildir_copies(node).values()) == len(accepted)


def test_random_placement_spreads_mail_and_never_picks_a_draining_shard(node_factory: Callable[..., Node]) -> None:
    node = node_factory(shards="4", shard_policy="random")
    assert node.command("shards", "drain", "2").returncode == 0
    start_smtpd(node)
    sent: list[str] = []
    with smtplib.SMTP("127.0.0.1", node.port, timeout=30) as client:
        client.ehlo("client.example.net")
        for i in range(300):
            client.mail("a@example.net")
            client.rcpt(f"user{i}@test.example")
            code, text = client.data(b"Subject: random\r\n\r\nbody\r\n")
            assert code == 250, text
            sent.append(text.decode().rsplit(" ", 1)[-1])
    spooled = where(node)
    shards = [spooled[m] for m in sent]
    assert all(len(s) == 1 for s in shards)  # each message in one spool, once
    picks = [s[0] for s in shards]
    counts = Counter(picks)
    assert set(counts) == {0, 1, 3}, counts  # never the draining shard
    assert min(counts.values()) >= 60, counts  # 100 expected each; below 60 is > 6 standard deviations off
    # not round robin (nor least-loaded's spreading): a fair choice repeats a shard back to back, all
    # but never in 300 picks ((2/3)**299), while a rotation never does
    assert any(a == b for a, b in itertools.pairwise(picks))


def test_added_shard_is_used_by_running_ingress_pool_and_scheduler(node_factory: Callable[..., Node],
                                                                   redis_url: str) -> None:
    node = node_factory(shards="2")
    start_smtpd(node)
    start(node, "worker", "local")  # on every shard (no --shards), as `run` starts it
    start(node, "scheduler")
    assert node.command("shards", "add").returncode == 0
    conn = connect(node.settings())
    sent: list[str] = []

    def queued_on_shard_2() -> bool:
        """Send a few more; true once one of them went to shard 2 (queued there, or delivered from
        there: its spent file went to the shard's free/ for reuse)."""
        with smtplib.SMTP("127.0.0.1", node.port, timeout=30) as client:
            client.ehlo("client.example.net")
            for i in range(10):
                client.mail("a@example.net")
                client.rcpt(f"n{len(sent)}.{i}@test.example")
                code, text = client.data(b"Subject: new shard\r\n\r\nbody\r\n")
                assert code == 250
                sent.append(text.decode().rsplit(" ", 1)[-1])
        spool = ShardMap(node.settings()).spool(2)
        return bool(os.listdir(spool.free)) or any(where(node).get(m) == [2] for m in sent)

    wait_until(queued_on_shard_2, timeout=30, what="ingress choosing shard 2 without a restart")
    space = Namespace.of(node.settings())
    wait_until(lambda: conn.get(lease_key(space, 2)) is not None, timeout=20, what="the scheduler leading shard 2")
    wait_until(lambda: not where(node), timeout=60, what="the pool delivering shard 2's mail")
    assert sum(maildir_copies(node).values()) == len(sent)


@pytest.mark.parametrize("crash", ["sigkill-midway", "rebalance_after_journal", "after_move_rename",
                                   "rebalance_after_move"])
def test_rebalance_killed_then_run_again_loses_and_duplicates_nothing(
        crash: str, node_factory: Callable[..., Node], dns_server: DnsServer,
        sink_factory: Callable[..., Sink]) -> None:
    count = 5000 if crash == "sigkill-midway" else 1500
    sink = sink_factory("127.0.1.43")
    node = node_factory(shards="1", dnsresolvers=dns_server.hostport)
    accepted = queue(node, count, "d43.test")  # all on shard 0, with their jobs there
    ids = sorted(e.id for e in accepted)
    assert node.command("shards", "add").returncode == 0 and node.command("shards", "add").returncode == 0
    old_enough(ids)
    if crash == "sigkill-midway":
        log = open(node.var_dir.parent / "rebalance-1.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen([sys.executable, "-m", "ops.cli", "shards", "rebalance", "--from", "0", "--to",
                                 "1,2"], env=node.env, stdout=log, stderr=subprocess.STDOUT)
        wait_until(lambda: sum(1 for s in where(node).values() if s != [0]) >= count // 3 or proc.poll() is not None,
                   timeout=60, interval=0.01, what="rebalance a third done")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        log.close()
        assert proc.returncode == -signal.SIGKILL, "finished before it could be killed"
    else:
        first = shards_command(node, "rebalance", "--from", "0", "--to", "1,2", SHARDMAIL_CRASH_AT=crash,
                               SHARDMAIL_CRASH_SKIP="1")  # in the second batch, with the first done
        assert first.returncode == -signal.SIGKILL, first.stderr
    spooled = where(node)
    assert sorted(spooled) == ids and all(len(s) == 1 for s in spooled.values())  # each in exactly one shard
    assert 0 < sum(1 for s in spooled.values() if s == [0]) < count  # really interrupted mid-way

    again = shards_command(node, "rebalance", "--from", "0", "--to", "1,2")
    assert again.returncode == 0, again.stderr
    spooled = where(node)
    assert sorted(spooled) == ids and all(len(s) == 1 for s in spooled.values())
    assert Counter(s[0] for s in spooled.values())[0] == 0
    settings = node.settings()
    conn = connect(settings)
    jobs = Jobs(conn, Namespace.of(settings))
    assert jobs.queue(0, "remote").count == 0  # the moved messages' old jobs are gone from shard 0
    assert not conn.exists(f"{settings.redis_prefix}:rebalance:journal")
    assert not conn.exists(pause_key(Namespace.of(settings), 0))

    start(node, "scheduler")
    start(node, "worker", "remote", "--name", "remote-0")
    wait_until(lambda: len(sink.transactions) >= count, timeout=180, interval=0.5, what="all delivered")
    wait_until(lambda: not where(node), timeout=60, interval=0.5, what="spool empty")
    delivered_once(sink, count, "d43.test")


def test_rebalance_keeps_retry_times_and_leaves_claimed_mail(node_factory: Callable[..., Node]) -> None:
    node = node_factory(shards="1")
    accepted = queue(node, 30, "d44.test")
    assert node.command("shards", "add").returncode == 0
    settings = node.settings()
    conn = connect(settings)
    jobs = Jobs(conn, Namespace.of(settings))
    busy = jobs.claim(0, "remote", 5, "someone-delivering")  # in flight: must stay where it is
    deferred = accepted[10]
    shard_map = ShardMap(settings)
    from core.envelope import Mark

    shard_map.spool(0).mark(deferred.id, [Mark(0, "deferred", "4.4.1", "connection refused", deferred.birth + 5)])
    old_enough([e.id for e in accepted])
    result = shards_command(node, "rebalance", "--from", "0", "--to", "1", "--count", "20")
    assert result.returncode == 0, result.stderr
    assert b"moved 20 messages from shard 0" in result.stdout
    spooled = where(node)
    assert all(spooled[c.message_id] == [0] for c in busy)
    assert sum(1 for s in spooled.values() if s == [1]) == 20
    if spooled[deferred.id] == [1]:
        from core.backoff import next_attempt

        score = conn.zscore(jobs.retry_key(1), f"{deferred.id}:remote")
        assert score == pytest.approx(next_attempt(deferred.birth, deferred.birth + 5, "remote"))
        assert shard_map.spool(1).read(deferred.id).shard == 1  # read where it lies
    moved = [m for m, s in spooled.items() if s == [1]]
    assert all(conn.zscore(jobs.retry_key(1), f"{m}:remote") is not None for m in moved)
    listing = json.dumps(node.command("shards", "list").stdout.decode())
    assert "open" in listing


def test_pause_keeps_consumers_and_the_scheduler_off_the_shard(redis_url: str) -> None:
    conn = redis.Redis.from_url(redis_url)
    jobs = Jobs(conn, Namespace("p", "n1"))
    from core.jobs import Item, pause_key

    jobs.enqueue([Item(0, f"{i:026X}", "local") for i in range(4)] + [Item(1, f"{i:026X}", "local")
                                                                      for i in range(10, 14)])
    conn.set(pause_key(Namespace("p", "n1"), 0), "rebalancer", px=30_000)
    claims = jobs.claim_many([0, 1], "local", 10, "w")
    assert {c.shard for c in claims} == {1} and len(claims) == 4
    leases = Leases(conn, Namespace("p", "n1"), "sched-1", lambda: [0, 1])
    assert dict(leases.renew()) == {0: None, 1: True}
    conn.delete(pause_key(Namespace("p", "n1"), 0))
    assert dict(leases.renew()) == {0: True, 1: False}
    conn.set(pause_key(Namespace("p", "n1"), 0), "rebalancer", px=30_000)
    assert dict(leases.renew())[0] is None
    assert conn.get("p:lease:n1/s0") is None  # given up, for the rebalancer to take
