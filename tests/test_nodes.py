"""Several nodes on one Redis under one prefix: each node's name is its namespace (its pools and
scheduler reach only its own shards), a name is held by one live node at a time, and
``status --cluster`` shows every node, a dead one's spool figures marked unknown."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from core.config import load
from core.jobs import Jobs
from core.nodes import Beat, Identity, NodeConflict, Registry, SpoolOwned
from core.redis_conn import connect
from core.shards import Namespace
from core.submit import Draft, Submitter
from tests.conftest import Node
from tests.support import wait_until
from tests.test_recovery import queue as queue_remote
from tests.test_recovery import start


def maildir(node: Node) -> list[str]:
    new = node.var_dir / "mail" / "catchall" / "new"
    return sorted(os.listdir(new)) if new.exists() else []


def queue_local(node: Node, count: int) -> list[str]:
    settings = node.settings()
    submitter = Submitter(settings, connect(settings))
    drafts = [Draft(submitter.new_id(), "a@example.net", [f"u{i}@test.example"], b"Subject: x\r\n\r\nx\r\n")
              for i in range(count)]
    return [e.id for e in submitter.accept_batch(drafts)]  # type: ignore[union-attr]


def test_identity_is_made_once_and_binds_the_spool_to_its_node(tmp_path: Path) -> None:
    env = {"SHARDMAIL_VAR_DIR": str(tmp_path / "var"), "SHARDMAIL_NODE": "alpha"}
    first = Identity.of(load(env=env))
    assert first.node == "alpha" and len(first.id) == 32
    assert Identity.of(load(env=env)) == first  # every process of the node reads the same id
    assert json.loads((tmp_path / "var" / "spool" / "node").read_text()) == {"node": "alpha", "id": first.id}
    with pytest.raises(SpoolOwned, match="belongs to node 'alpha'"):
        Identity.of(load(env=dict(env, SHARDMAIL_NODE="beta")))


def test_a_name_is_held_by_one_live_node(redis_url: str) -> None:
    conn = redis.Redis.from_url(redis_url)
    registry = Registry(conn, Namespace("c", "x"), dead_after=30)
    mine, other = Identity("alpha", "1" * 32), Identity("alpha", "2" * 32)
    registry.claim(mine, Beat("127.0.0.1:25", [0, 1], [], {0: (3, 1, None)}, 100.0), now=1000.0)
    registry.claim(mine, Beat("127.0.0.1:25", [0, 1]), now=1010.0)  # a restart of the same node takes it back
    with pytest.raises(NodeConflict, match=r"in use by a live node on \S+ \(heartbeat 5 s ago"):
        registry.claim(other, Beat(), now=1015.0)
    (record,) = registry.nodes(now=1015.0)
    assert (record.name, record.id, record.alive, record.shards, record.address) == (
        "alpha", mine.id, True, [0, 1], "127.0.0.1:25")
    assert not registry.nodes(now=1041.0)[0].alive  # 31 s without a heartbeat: dead
    registry.claim(other, Beat(), now=1041.0)  # and its name free for a replacement
    assert registry.nodes(now=1041.0)[0].id == other.id
    registry.forget("alpha")
    assert registry.nodes(now=1041.0) == []


def test_two_nodes_on_one_prefix_each_deliver_only_their_own(node_factory: Callable[..., Node]) -> None:
    node_a = node_factory(node="alpha", shards="2")
    node_b = node_factory(node="beta", shards="2")
    assert node_a.settings().redis_prefix == node_b.settings().redis_prefix
    first = queue_local(node_a, 20)  # queued first: a pool that could claim alpha's jobs would take them
    queue_local(node_b, 20)
    start(node_b, "worker", "local")
    start(node_b, "scheduler")
    wait_until(lambda: len(maildir(node_b)) == 20, timeout=30, what="beta delivering its own 20")
    jobs_a = Jobs(connect(node_a.settings()), Namespace.of(node_a.settings()))
    assert sum(jobs_a.depths([0, 1]).values()) == 20  # alpha's jobs untouched by beta's pool
    assert sorted(node_a.spooled()) == sorted(first) and maildir(node_a) == []
    start(node_a, "worker", "local")
    wait_until(lambda: len(maildir(node_a)) == 20, timeout=30, what="alpha delivering its own 20")
    assert {name.split(".")[1][1:27] for name in maildir(node_a)} == set(first)  # .Q<id>R<n>.
    assert len(maildir(node_b)) == 20
    rq_info = subprocess.run([sys.executable, "-m", "rq.cli", "info", "--url", node_a.settings().redis_url],
                             capture_output=True, text=True, timeout=30)
    for queue in ("shardmail.alpha.s0.local", "shardmail.alpha.s1.local", "shardmail.beta.s0.local",
                  "shardmail.beta.s1.local"):
        assert queue in rq_info.stdout, rq_info.stdout
    assert "2 workers" in rq_info.stdout  # one pool per node, each on its own node's queues


def test_a_second_node_under_a_live_name_is_refused_at_start(node_factory: Callable[..., Node]) -> None:
    alpha = node_factory(node="alpha")
    start(alpha, "scheduler")
    conn = connect(alpha.settings())
    registry = Registry.of(alpha.settings(), conn)
    wait_until(lambda: [r.name for r in registry.nodes(time.time())] == ["alpha"], timeout=20,
               what="alpha's first heartbeat")
    impostor = node_factory(node="alpha")  # another spool, the same name
    for argv in (["scheduler"], ["run"]):
        done = subprocess.run([sys.executable, "-m", "ops.cli", *argv], env=impostor.env, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 78, (argv, done.stdout, done.stderr)
        assert "node name 'alpha' is in use by a live node" in done.stderr + done.stdout
    ((record,),) = [registry.nodes(time.time())]
    assert record.id == Identity.of(alpha.settings()).id  # the impostor took nothing


def cluster(node: Node, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ops.cli", "status", "--cluster", *args], env=node.env,
                          capture_output=True, text=True, timeout=60)


def test_status_cluster_shows_every_node_and_a_dead_ones_share_as_unknown(node_factory: Callable[..., Node]) -> None:
    alpha = node_factory(node="alpha", shards="2", nodedeadafter="3")  # a heartbeat a second
    beta = node_factory(node="beta", shards="3", nodedeadafter="3")
    start(alpha, "worker", "local")
    start(alpha, "scheduler")
    beta_scheduler = start(beta, "scheduler")
    queue_remote(beta, 5, "nowhere.test")  # no remote pool on beta: they stay ready

    def both_alive_with_beta_counted() -> dict | None:
        doc = json.loads(cluster(alpha, "--json").stdout)
        nodes = {n["node"]: n for n in doc["nodes"]}
        ok = set(nodes) == {"alpha", "beta"} and all(n["alive"] for n in nodes.values()) and \
            nodes["beta"]["status"]["total"]["spooled"] == 5 and bool(nodes["alpha"]["status"]["pools"])
        return doc if ok else None

    doc = wait_until(both_alive_with_beta_counted, timeout=30, what="both alive, beta's 5 spooled, alpha's pool")
    beta_doc = next(n for n in doc["nodes"] if n["node"] == "beta")
    assert [s["shard"] for s in beta_doc["status"]["shards"]] == [0, 1, 2]
    assert beta_doc["status"]["total"]["channels"]["remote"]["ready"] == 5
    assert doc["total"]["nodes"] == 2 and doc["total"]["alive"] == 2 and doc["total"]["spooled"] == 5
    alpha_doc = next(n for n in doc["nodes"] if n["node"] == "alpha")
    assert any(p["channel"] == "local" for p in alpha_doc["status"]["pools"])
    beta_scheduler.send_signal(signal.SIGKILL)
    beta_scheduler.wait(10)

    def beta_dead() -> dict | None:
        doc = json.loads(cluster(alpha, "--json").stdout)
        return doc if not next(n for n in doc["nodes"] if n["node"] == "beta")["alive"] else None

    doc = wait_until(beta_dead, timeout=30, what="beta shown dead")
    beta_doc = next(n for n in doc["nodes"] if n["node"] == "beta")
    assert beta_doc["spool_known"] is False and beta_doc["heartbeat_age"] >= 3
    assert beta_doc["status"]["total"]["channels"]["remote"]["ready"] == 5  # Redis still knows these
    assert doc["total"]["spool_unknown"] == 1 and doc["total"]["alive"] == 1 and doc["total"]["ready"] == 5
    text = cluster(alpha).stdout
    (beta_line,) = [line for line in text.splitlines() if line.startswith("beta ")]
    assert " DEAD " in beta_line and " ? " in beta_line
    assert "1/2 alive" in text and "1 node(s) dead" in text
    detail = cluster(alpha, "--node", "beta")
    assert detail.returncode == 0 and "remote" in detail.stdout and "open" in detail.stdout
    assert cluster(alpha, "--node", "gamma").returncode == 64
    assert alpha.command("forget", "alpha").returncode == 64  # not itself
    forgot = alpha.command("forget", "beta")  # its disk is lost, say: only its traces in Redis go
    assert forgot.returncode == 0 and b"5 of its jobs dropped" in forgot.stdout, forgot
    doc = json.loads(cluster(alpha, "--json").stdout)
    assert [n["node"] for n in doc["nodes"]] == ["alpha"] and doc["total"]["ready"] == 0


AWAY = """dn: uid=away,ou=people,dc=test
objectClass: inetOrgPerson
objectClass: qmailUser
uid: away
cn: away
sn: away
mail: away@test.example
mailMessageStore: away/
deliveryMode: reply
mailReplyText: Away for the week.
"""


def test_the_autoresponder_answers_once_for_the_cluster(node_factory: Callable[..., Node], tmp_path: Path) -> None:
    users = tmp_path / "away.ldif"
    users.write_text(AWAY)
    nodes = [node_factory(node=name, users_ldif=str(users)) for name in ("alpha", "beta")]
    for node in nodes:  # the same sender writes to the user through each node
        settings = node.settings()
        Submitter(settings, connect(settings)).accept(
            Draft(Submitter(settings, connect(settings)).new_id(), "friend@example.net", ["away@test.example"],
                  b"Subject: hello\r\n\r\nhi\r\n"))
        start(node, "worker", "local")

    def inbox(node: Node) -> list[str]:
        new = node.var_dir / "mail" / "away" / "new"
        return os.listdir(new) if new.exists() else []

    def senders(node: Node) -> list[str]:
        found = []
        for message_id in node.spooled():
            with contextlib.suppress(FileNotFoundError):  # done and removed since the listing
                found.append(node.message(message_id)[0].sender)
        return found

    # each original done (delivered, its entry gone), with whatever reply it caused queued before that
    wait_until(lambda: all(len(inbox(n)) == 1 and "friend@example.net" not in senders(n) for n in nodes),
               timeout=30, what="both copies delivered and done")
    replies = [node.message(i)[0] for node in nodes for i in node.spooled()]
    assert [(r.sender, [x.address for x in r.recipients]) for r in replies] == [("", ["friend@example.net"])]


def test_adopt_takes_in_a_killed_nodes_spool_and_honours_its_checkpoints(node_factory: Callable[..., Node]) -> None:
    from core.envelope import Mark
    from core.shards import ShardMap

    alpha = node_factory(node="alpha", shards="2", nodedeadafter="3")
    beta = node_factory(node="beta", shards="3", nodedeadafter="3")
    beta_tree = [start(beta, "scheduler"), start(beta, "worker", "remote")]  # no local pool: its mail stays
    registry = Registry.of(alpha.settings(), connect(alpha.settings()))
    wait_until(lambda: "beta" in [r.name for r in registry.nodes(time.time())], timeout=20, what="beta's heartbeat")
    settings = beta.settings()
    submitter = Submitter(settings, connect(settings))
    pairs = submitter.accept_batch([Draft(submitter.new_id(), "a@example.net", [f"p{i}@test.example",
                                                                                f"q{i}@test.example"], b"x\r\n")
                                    for i in range(10)])
    singles = queue_local(beta, 20)
    beta_map = ShardMap(settings)
    for envelope in pairs:  # the first recipient of each was delivered before the crash: its checkpoint
        beta_map.spool(envelope.shard).mark(envelope.id, [Mark(0, "delivered", "2.0.0", "ok", time.time())])  # type: ignore[union-attr]
    held = singles[0]
    assert beta.command("queue", "hold", held).returncode == 0
    refused = alpha.command("adopt", "--spool", str(settings.spool_root), "--from", "beta")
    assert refused.returncode == 64 and b"still has a live heartbeat" in refused.stderr
    for proc in beta_tree:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    wrong = alpha.command("adopt", "--spool", str(settings.spool_root), "--from", "gamma")
    assert wrong.returncode == 64 and b"belongs to node 'beta'" in wrong.stderr
    wait_until(lambda: not next(r for r in registry.nodes(time.time()) if r.name == "beta").alive, timeout=20,
               what="beta dead")
    start(alpha, "worker", "local")
    start(alpha, "scheduler")
    done = alpha.command("adopt", "--spool", str(settings.spool_root), "--from", "beta")
    assert done.returncode == 0, done.stderr
    assert b"29 queued and 1 held entries" in done.stdout, done.stdout
    wait_until(lambda: len(maildir(alpha)) == 10 + 19, timeout=60, what="alpha delivering beta's mail")
    names = maildir(alpha)
    by_message: dict[str, list[str]] = {}
    for name in names:
        token = name.split(".")[1]  # Q<id>R<index>
        by_message.setdefault(token[1:27], []).append(token[28:])
    assert all(by_message[e.id] == ["1"] for e in pairs)  # type: ignore[union-attr]  # only the second recipient
    assert set(singles[1:]) <= set(by_message) and held not in by_message
    alpha_map = ShardMap(alpha.settings())
    assert [m for s in alpha_map.ids(fresh=True) for m in alpha_map.spool(s).held()] == [held]  # held on alpha
    assert "beta" not in [r.name for r in registry.nodes(time.time())]
    conn = connect(alpha.settings())
    assert not [k for k in conn.scan_iter("*beta*")]  # nothing of beta's left in Redis
    again = alpha.command("adopt", "--spool", str(settings.spool_root), "--from", "beta")
    assert again.returncode == 0 and b"0 queued and 0 held entries" in again.stdout  # a rerun is harmless
    back = beta.command("scheduler")
    assert back.returncode == 78 and b"was adopted by node 'alpha'" in back.stderr + back.stdout
