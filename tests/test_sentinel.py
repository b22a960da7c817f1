"""Redis under Sentinel: every process finds the primary through real ``redis-sentinel`` processes
and follows a failover by itself. Under a bounded SMTP load on two nodes, SIGKILL of the primary
(a replica promoted by the sentinels) loses no accepted mail: each local recipient is delivered
exactly once, each remote one at least once and doubled at most once (DESIGN §2)."""

from __future__ import annotations

import itertools
import re
import signal
import smtplib
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
import redis.sentinel

from core.config import ConfigError, load
from core.redis_conn import connect, connect_shared, describe, private_client
from tests.conftest import Node, _connectable
from tests.dns_server import DnsServer
from tests.sentinel import MASTER, Deployment
from tests.smtp_peers import Sink
from tests.support import free_port, wait_until

KILL_AFTER = 150  # accepted messages before the primary is killed
AFTER_KILL = 150  # accepted after the failover before the load stops
MESSAGES_CAP = 3000  # the load's bound, whatever happens


def sentinel_env(deployment: Deployment) -> dict[str, str]:
    return {"redis_url": "", "redis_sentinels": ",".join(deployment.addresses), "redis_master": MASTER}


def test_sentinel_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="redis_sentinels"):
        load(env={"SHARDMAIL_REDIS_SENTINELS": "127.0.0.1"})
    settings = load(env={"SHARDMAIL_REDIS_SENTINELS": "127.0.0.1:26379,[::1]:26380", "SHARDMAIL_REDIS_MASTER": "m"})
    assert describe(settings) == "primary 'm' of sentinels 127.0.0.1:26379, [::1]:26380"
    pool = connect_shared(settings).connection_pool
    assert isinstance(pool, redis.sentinel.SentinelConnectionPool) and pool.service_name == "m"
    assert [s.connection_pool.connection_kwargs["host"] for s in pool.sentinel_manager.sentinels] == ["127.0.0.1",
                                                                                                       "::1"]


def test_clients_follow_a_failover(sentinel_deployment: Deployment) -> None:
    settings = load(env={f"SHARDMAIL_{k.upper()}": v for k, v in sentinel_env(sentinel_deployment).items()})
    conn = connect(settings)
    blocking = private_client(conn)  # the pools' wake-up waits use one of these
    conn.set("before", "1")
    wait_until(lambda: redis.Redis(port=next(p for p in sentinel_deployment.servers
                                             if p != sentinel_deployment.primary)).get("before") == b"1",
               what="the write replicated")
    old = sentinel_deployment.primary
    new = sentinel_deployment.kill_primary()
    assert new != old

    def writes() -> bool:
        try:
            return bool(conn.set("after", "2")) and blocking.ping()
        except redis.RedisError:  # a connection to the old primary fails once; the next asks the sentinels
            return False

    wait_until(writes, timeout=20, interval=0.1, what="writes on the new primary")
    assert conn.get("before") == b"1"
    assert redis.Redis(port=new).get("after") == b"2"
    assert conn.connection_pool.get_master_address() == ("127.0.0.1", new)  # type: ignore[attr-defined]


def recipients(i: int) -> list[str]:
    return [[f"l{i}@test.example"], [f"r{i}@d48.test"], [f"l{i}@test.example", f"r{i}@d48.test"]][i % 3]


def send(host: str, port: int, i: int) -> bool:
    """True when the node said 250; a refusal (451 while Redis fails over) is the client's to retry
    later, so it counts as not accepted, and a cut-off transaction is not sent again."""
    body = f"From: <a@example.net>\r\nSubject: msg {i}\r\n\r\nmessage number {i}\r\n"
    try:
        with smtplib.SMTP(host, port, timeout=20) as client:
            client.sendmail("a@example.net", recipients(i), body)
        return True
    except (OSError, smtplib.SMTPException):
        return False


def local_copies(node: Node) -> Counter[str]:
    new = node.var_dir / "mail" / "catchall" / "new"
    copies: Counter[str] = Counter()
    for path in new.iterdir() if new.exists() else []:
        to = re.search(rb"^Delivered-To: (\S+)", path.read_bytes(), re.M)
        assert to is not None
        copies[to.group(1).decode()] += 1
    return copies


def test_a_failover_under_load_loses_nothing(sentinel_deployment: Deployment, node_factory: Callable[..., Node],
                                             dns_server: DnsServer, sink_factory: Callable[..., Sink],
                                             tmp_path: Path) -> None:
    sink = sink_factory("127.0.1.48")
    hosts = ["127.0.0.2", "127.0.0.3"]
    ports = [free_port(host) for host in hosts]
    nodes = [node_factory(node=f"n{i + 1}", smtp_listen=f"{hosts[i]}:{ports[i]}", relaynets="127.0.0.0/8",
                          dnsresolvers=dns_server.hostport, ingress_processes="1", sweepinterval="3",
                          nodedeadafter="6", metrics_listen="", **sentinel_env(sentinel_deployment))
             for i in range(2)]
    supervisors, logs = [], []
    for node in nodes:
        log = node.var_dir.parent / "run.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "wb") as out:
            supervisors.append(subprocess.Popen([sys.executable, "-m", "ops.cli", "run"], env=node.env, stdout=out,
                                                stderr=subprocess.STDOUT))
        logs.append(log)
    accepted: list[int] = []
    after_kill: list[int] = []
    killed = threading.Event()
    lock = threading.Lock()
    numbers = itertools.count()
    deadline = time.monotonic() + 90

    def client() -> None:
        """Sends until enough mail was accepted after the failover (or the deadline, or the cap)."""
        while len(after_kill) < AFTER_KILL and time.monotonic() < deadline:
            i = next(numbers)
            if i >= MESSAGES_CAP:
                return
            ok = send(hosts[i % 2], ports[i % 2], i)
            with lock:
                if ok:
                    accepted.append(i)
                    if killed.is_set():
                        after_kill.append(i)
                kill_now = len(accepted) == KILL_AFTER and not killed.is_set()
            if kill_now:
                sentinel_deployment.kill_primary()
                killed.set()
            elif not ok:
                time.sleep(0.05)  # a refused client's pause before it tries again

    try:
        for log in logs:
            wait_until(lambda log=log: "shardmail is running" in log.read_text(errors="replace"), 30, "node up")
        for host, port in zip(hosts, ports, strict=True):
            wait_until(lambda host=host, port=port: _connectable(port, host), 30, "SMTP up")
        assert "sentinels" in logs[0].read_text()  # it says where Redis is: no embedded server was started
        threads = [threading.Thread(target=client) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert killed.is_set()
        assert len(after_kill) >= AFTER_KILL  # service came back after the failover
        wait_until(lambda: all(n.spooled() == [] for n in nodes), timeout=120, interval=0.5,
                   what="every accepted message delivered")
    finally:
        for proc in supervisors:
            proc.send_signal(signal.SIGTERM)
        for proc in supervisors:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
    copies = local_copies(nodes[0]) + local_copies(nodes[1])
    remote = Counter(r for t in sink.transactions for r in t.recipients)
    for i in accepted:
        for address in recipients(i):
            if address.endswith("@test.example"):
                assert copies[address] == 1, (i, address, copies[address])
            else:
                assert remote[address] >= 1, (i, address, "not delivered")
    assert set(copies) <= {a for i in accepted for a in recipients(i)}  # nothing refused was delivered
    assert max(remote.values()) <= 2 and sum(remote.values()) - len(remote) <= 1
    assert not (tmp_path / "var" / "redis").exists() and not (nodes[0].var_dir / "redis").exists()
    print(f"accepted {len(accepted)} ({len(after_kill)} after the failover), "
          f"remote duplicates {sum(remote.values()) - len(remote)}", file=sys.stderr)
