"""Two shardmail nodes on loopback, one Redis and one prefix (each node's name its namespace): mail
for a user whose mailHost is the other node is handed over (SMTP, or QMQP with clusterforward =
qmqp) and delivered there; a message a peer already handed over is never sent round again."""

from __future__ import annotations

import smtplib
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Node, free_port, wait_until
from tests.test_qmqpd import listens

USERS = """dn: uid=remote,ou=people,dc=example,dc=test
objectClass: inetOrgPerson
objectClass: qmailUser
uid: remote
cn: remote
sn: remote
mail: remote@test.example
mailHost: mx2.test.example
mailMessageStore: remote/

dn: uid=pingpong,ou=people,dc=example,dc=test
objectClass: inetOrgPerson
objectClass: qmailUser
uid: pingpong
cn: pingpong
sn: pingpong
mail: pingpong@test.example
mailHost: mx3.test.example
mailMessageStore: pingpong/
"""


def start(node: Node, qmqp: bool = False) -> Path:
    """smtpd, a local pool (and qmqpd); returns the pool's log."""
    node.start_smtpd()
    log = node.var_dir.parent / "worker.log"
    roles = [["worker", "local"]] + ([["qmqpd"]] if qmqp else [])
    for role in roles:
        with open(node.var_dir.parent / f"{role[0]}.log", "wb") as out:
            node.procs.append(subprocess.Popen([sys.executable, "-m", "ops.cli", *role], env=node.env,
                                               stdout=out, stderr=subprocess.STDOUT))
    return log


@pytest.mark.parametrize("transport", ["smtp", "qmqp"])
def test_mailhost_routes_to_the_peer_and_loops_are_refused(node_factory: Callable[..., Node], tmp_path: Path,
                                                           transport: str) -> None:
    users = tmp_path / "cluster.ldif"
    users.write_text(USERS)
    port_b = free_port()
    qmqp_a, qmqp_b = free_port(), free_port()
    by_qmqp = {"clusterforward": "qmqp", "qmqpclients": "127.0.0.0/8"} if transport == "qmqp" else {}
    node_a = node_factory(me="mx.test.example", users_ldif=str(users), node="mx1",
                          ldapmessagestore=str(tmp_path / "mail-a"), qmqp_listen=f"127.0.0.1:{qmqp_a}",
                          smtproutes=f"mx2.test.example:127.0.0.1:{port_b},mx3.test.example:127.0.0.1:{port_b}",
                          qmqproutes=f"mx2.test.example:127.0.0.1:{qmqp_b},mx3.test.example:127.0.0.1:{qmqp_b}",
                          **by_qmqp)
    node_b = node_factory(me="mx2.test.example", users_ldif=str(users), node="mx2",
                          ldapmessagestore=str(tmp_path / "mail-b"), smtp_listen=f"127.0.0.1:{port_b}",
                          qmqp_listen=f"127.0.0.1:{qmqp_b}", smtproutes=f"mx3.test.example:127.0.0.1:{node_a.port}",
                          qmqproutes=f"mx3.test.example:127.0.0.1:{qmqp_a}", **by_qmqp)
    node_b.port = port_b
    start(node_a, transport == "qmqp")
    log_b = start(node_b, transport == "qmqp")
    if transport == "qmqp":
        for port in (qmqp_a, qmqp_b):
            wait_until(lambda port=port: listens(port), timeout=20, what="qmqpd listening")
    with smtplib.SMTP("127.0.0.1", node_a.port, timeout=10) as client:
        client.sendmail("a@example.net", ["remote@test.example"], b"Subject: to the other node\r\n\r\nhi\r\n")
        client.sendmail("a@example.net", ["pingpong@test.example"], b"Subject: round and round\r\n\r\nhi\r\n")
    inbox = tmp_path / "mail-b" / "remote" / "new"
    wait_until(lambda: inbox.exists() and len(list(inbox.iterdir())) == 1, timeout=30)
    message = next(inbox.iterdir()).read_bytes()
    assert b"X-Shardmail-Cluster: mx.test.example\n" in message
    assert (b"with QMQP" in message) == (transport == "qmqp")
    assert b"Subject: to the other node" in message
    assert not (tmp_path / "mail-a" / "remote").exists()
    # pingpong: A hands it to B (mx3 routes there); B must not send it on: it fails 5.4.6 there
    wait_until(lambda: "to <pingpong@test.example>: failed 5.4.6 Cluster loop" in log_b.read_text(), timeout=30)
    wait_until(lambda: node_a.spooled() == [] and len(node_b.spooled()) == 1, timeout=30)
    # B keeps the failed message for its scheduler's bounce (no scheduler runs here)
    ((entry_id,),) = [node_b.spooled()]
    from core.shards import ShardMap

    shard_map = ShardMap(node_b.settings())
    (mark,) = next(shard_map.spool(s).read(entry_id) for s in shard_map.ids()
                   if entry_id in shard_map.spool(s).ids()).marks
    assert (mark.state, mark.status) == ("failed", "5.4.6")
    assert not (tmp_path / "mail-a" / "pingpong").exists() and not (tmp_path / "mail-b" / "pingpong").exists()
