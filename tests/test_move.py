"""``shardmail queue move`` and ``shards move``: two nodes on one Redis and prefix; n1 holds queued
mail and runs no pools, n2 runs qmqpd, its local pool and its scheduler (whose heartbeat announces
the QMQP listener). Every remaining recipient is delivered exactly once at n2, held mail stays held
there, and n1's spool and Redis keep nothing of what moved; a mover SIGKILLed at each journal step
and run again loses nothing and doubles at most the one message whose K was in flight; a target
that does not answer leaves everything where it was."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from core.envelope import Envelope, Mark
from core.jobs import Jobs, job_id
from core.nodes import Registry
from core.qmqp import Reply, send
from core.redis_conn import connect
from core.shards import Namespace, ShardMap
from core.submit import Draft, Submitter
from ops.move import Journal
from tests.conftest import Node
from tests.support import free_port, wait_until
from tests.test_qmqpd import listens
from tests.test_recovery import start

STEPS = ["sending", "held", "accepted", "sent", "removed", "done"]


@dataclass
class Cluster:
    n1: Node
    n2: Node
    qmqp_port: int


def two_nodes(node_factory: Callable[..., Node], qmqpd: bool = True) -> Cluster:
    """n1 (no processes) and n2 (scheduler, and unless told otherwise qmqpd and a local pool), n2
    alive in the registry with its QMQP listener."""
    port = free_port()
    n1 = node_factory(node="n1", shards="2")
    n2 = node_factory(node="n2", shards="2", qmqp_listen=f"127.0.0.1:{port}", qmqpclients="127.0.0.0/8")
    start(n2, "scheduler")
    if qmqpd:
        start(n2, "qmqpd")
        start(n2, "worker", "local")
        wait_until(lambda: listens(port), timeout=20, what="n2's qmqpd listening")
    registry = Registry.of(n1.settings(), connect(n1.settings()))
    wait_until(lambda: any(r.name == "n2" and r.alive and r.qmqp for r in registry.nodes(time.time())),
               timeout=20, what="n2's heartbeat with its QMQP listener")
    return Cluster(n1, n2, port)


def queue_mail(node: Node, recipients: list[list[str]]) -> list[Envelope]:
    """One message per recipient list (local addresses), accepted on ``node``."""
    settings = node.settings()
    submitter = Submitter(settings, connect(settings))
    drafts = [Draft(submitter.new_id(), "sender@example.net", rcpts,
                    f"Subject: move {n}\r\n\r\nbody of message {n}\r\n".encode()) for n, rcpts in enumerate(recipients)]
    results = submitter.accept_batch(drafts)
    assert all(isinstance(r, Envelope) for r in results)
    return results  # type: ignore[return-value]


def checkpoint(node: Node, envelope: Envelope, index: int, state: str) -> None:
    """A recipient's outcome recorded on the spool entry, as a pool would have."""
    status = {"delivered": "2.0.0", "deferred": "4.2.2"}[state]
    ShardMap(node.settings()).spool(envelope.shard).mark(envelope.id, [Mark(index, state, status, state, time.time())])  # type: ignore[arg-type]


def delivered(node: Node) -> Counter[str]:
    """Recipients of the copies in the node's Maildir (its Delivered-To lines)."""
    new = node.var_dir / "mail" / "catchall" / "new"
    copies: Counter[str] = Counter()
    for name in os.listdir(new) if new.exists() else []:
        for line in (new / name).read_bytes().split(b"\n")[:3]:
            if line.startswith(b"Delivered-To: "):
                copies[line[14:].strip().decode()] += 1
    return copies


def held_on(node: Node) -> list[tuple[Envelope, bytes]]:
    shard_map = ShardMap(node.settings())
    return [shard_map.spool(s).load(i, held=True) for s in shard_map.ids(fresh=True) for i in shard_map.spool(s).held()]


def traces(node: Node, ids: set[str]) -> set[str]:
    """What the node's spool (queued or held) and Redis (doorbells, rq's job hashes) still hold of
    these messages."""
    settings = node.settings()
    shard_map = ShardMap(settings)
    jobs = Jobs(connect(settings), Namespace.of(settings))
    found = set()
    for shard in shard_map.ids(fresh=True):
        spool = shard_map.spool(shard)
        found |= {f"spool:{i}" for i in (*spool.ids(), *spool.held()) if i in ids}
        found |= {f"redis:{d}" for d in jobs.doorbells(shard) if d.split(":")[0] in ids}
    conn = connect(settings)
    found |= {f"redis:{key}" for i in ids for channel in ("local", "remote")
              if conn.exists(key := f"rq:job:{job_id(Namespace.of(settings), i, channel)}")}
    return found


def mover(node: Node, *args: str, crash: str = "") -> subprocess.CompletedProcess[str]:
    env = dict(node.env, SHARDMAIL_CRASH_AT=f"move.{crash}") if crash else node.env
    return subprocess.run([sys.executable, "-m", "ops.cli", *args], env=env, capture_output=True, text=True,
                          timeout=60)


def the_mail(cluster: Cluster) -> tuple[list[Envelope], set[str]]:
    """Four messages on n1: two plain, one with a recipient delivered already (a checkpoint) and one
    deferred, one held; and the recipients still to be delivered."""
    plain, partial, deferred, held = queue_mail(cluster.n1, [["a1@test.example", "a2@test.example"],
                                                             ["b1@test.example", "b2@test.example"],
                                                             ["c1@test.example"], ["h1@test.example"]])
    checkpoint(cluster.n1, partial, 0, "delivered")
    checkpoint(cluster.n1, deferred, 0, "deferred")
    jobs = Jobs(connect(cluster.n1.settings()), Namespace.of(cluster.n1.settings()))
    jobs.forget(deferred.shard, deferred.id, time.time())  # as the scheduler has it: due in an hour
    jobs.schedule(deferred.shard, [(deferred.id, "local", time.time() + 3600)])
    assert cluster.n1.command("queue", "hold", held.id).returncode == 0
    return [plain, partial, deferred, held], {"a1@test.example", "a2@test.example", "b2@test.example",
                                              "c1@test.example"}


def test_queue_move_and_shards_move_deliver_each_remaining_recipient_once_and_keep_the_hold(
        node_factory: Callable[..., Node]) -> None:
    cluster = two_nodes(node_factory)
    mail, wanted = the_mail(cluster)
    plain, _, _, held = mail
    more = queue_mail(cluster.n1, [[f"m{i}@test.example"] for i in range(6)])  # spread over s0 and s1
    wanted |= {f"m{i}@test.example" for i in range(6)}
    result = mover(cluster.n1, "queue", "move", plain.id, held.id, "--to", "n2")
    assert result.returncode == 0, result.stdout + result.stderr
    *lines, summary = result.stdout.splitlines()
    said = {line.split(":")[0]: line for line in lines}  # handed over in parallel: in any order
    assert said[plain.id].startswith(f"{plain.id}: moved to n2 as ") and "(2 recipient(s))" in said[plain.id]
    assert said[held.id].startswith(f"{held.id}: moved to n2 as ") and said[held.id].endswith(
        "(1 recipient(s), on hold)")
    assert len(lines) == 2 and summary == "move to n2: moved 2, left 0 (temporary), refused 0"
    for shard in (0, 1):
        result = mover(cluster.n1, "shards", "move", f"n1/s{shard}", "--to", "n2")
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.splitlines()[-1].startswith("move to n2: moved ")
    assert ShardMap(cluster.n1.settings()).draining() == {0, 1}  # ingress no longer chooses them
    everything = {e.id for e in [*mail, *more]}
    assert traces(cluster.n1, everything) == set()
    wait_until(lambda: sum(delivered(cluster.n2).values()) >= len(wanted - {"h1@test.example"}), timeout=30,
               what="n2 delivering what moved")
    copies = delivered(cluster.n2)
    assert set(copies) == wanted - {"h1@test.example"} and max(copies.values()) == 1
    assert "b1@test.example" not in copies  # delivered before the move: not again
    ((envelope, body),) = held_on(cluster.n2)  # held there too, never delivered
    assert [r.address for r in envelope.recipients] == ["h1@test.example"]
    assert envelope.birth == pytest.approx(held.birth, abs=1e-3)  # its retries and lifetime go on
    assert b"X-Shardmail-Move" not in body and b"with QMQP" in body and b"Subject: move 3" in body
    wait_until(lambda: cluster.n2.spooled() == [], timeout=20, what="n2's queue empty")
    assert held_on(cluster.n2)[0][0].id == envelope.id


@pytest.mark.parametrize("step", STEPS)
def test_a_move_killed_at_each_step_and_run_again_loses_nothing_and_doubles_nothing(
        node_factory: Callable[..., Node], step: str) -> None:
    """Eight messages at a time (the default): the kill finds one at its step and the others
    anywhere on their way; one whose K was in flight is asked for again, and the target, which
    remembers what was moved to it, answers with the same id instead of a second copy."""
    cluster = two_nodes(node_factory)
    mail, wanted = the_mail(cluster)
    ids = [e.id for e in mail]
    killed = mover(cluster.n1, "queue", "move", *ids, "--to", "n2", crash=step)
    assert killed.returncode == -9, killed.stdout + killed.stderr  # died at move.<step>
    again = mover(cluster.n1, "queue", "move", *ids, "--to", "n2")
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.splitlines()[-1].startswith("move to n2: moved ")
    assert_moved_once(cluster, ids, wanted, doubled=set())


def test_without_the_targets_memory_a_k_in_flight_doubles_one_message_at_most(
        node_factory: Callable[..., Node]) -> None:
    """The journal's own bound: the target's record of moved mail lost (Redis flushed between the
    runs, say), a mover killed with a K in flight, one message at a time, doubles that one message."""
    cluster = two_nodes(node_factory)
    mail, wanted = the_mail(cluster)
    ids = [e.id for e in mail]
    killed = mover(cluster.n1, "queue", "move", *ids, "--to", "n2", "--parallel", "1", crash="accepted")
    assert killed.returncode == -9, killed.stdout + killed.stderr
    conn = connect(cluster.n2.settings())
    (key,) = conn.keys("shardmail:moved:n2:*")
    assert key.decode() == f"shardmail:moved:n2:n1/{ids[0]}"
    conn.delete(key)
    again = mover(cluster.n1, "queue", "move", *ids, "--to", "n2", "--parallel", "1")
    assert again.returncode == 0, again.stdout + again.stderr
    assert_moved_once(cluster, ids, wanted, doubled={"a1@test.example", "a2@test.example"})


def assert_moved_once(cluster: Cluster, ids: list[str], wanted: set[str], doubled: set[str]) -> None:
    """Nothing of the messages left on n1 (spool, Redis, an open journal); every remaining
    recipient delivered at n2, those in ``doubled`` twice and the others once; the held one held."""
    assert not (cluster.n1.settings().spool_root / "move.journal").exists()  # nothing open: journal gone
    assert traces(cluster.n1, set(ids)) == set()
    expected = Counter({address: 2 if address in doubled else 1 for address in wanted})
    wait_until(lambda: delivered(cluster.n2) == expected or None, timeout=30, what="every remaining recipient at n2")
    assert [[r.address for r in e.recipients] for e, _ in held_on(cluster.n2)] == [["h1@test.example"]]
    wait_until(lambda: cluster.n2.spooled() == [], timeout=20, what="n2's queue empty")
    assert delivered(cluster.n2) == expected  # and no further copy after all


def test_a_target_that_does_not_answer_leaves_everything(node_factory: Callable[..., Node]) -> None:
    cluster = two_nodes(node_factory, qmqpd=False)  # alive and announcing QMQP, but nobody listens
    mail, _ = the_mail(cluster)
    ids = [e.id for e in mail]
    before = traces(cluster.n1, set(ids))
    result = mover(cluster.n1, "queue", "move", *ids, "--to", "n2")
    assert result.returncode == 75, result.stdout + result.stderr
    assert result.stdout.splitlines()[-1] == "move to n2: moved 0, left 4 (temporary), refused 0"
    assert "Connection refused" in result.stderr
    assert sorted(cluster.n1.spooled()) == sorted(ids[:3])  # queued again, not left on hold
    assert [e.id for e, _ in held_on(cluster.n1)] == [ids[3]]
    assert traces(cluster.n1, set(ids)) == before  # and their doorbells rung as before:
    settings = cluster.n1.settings()
    jobs = Jobs(connect(settings), Namespace.of(settings))
    queued = {i for shard in (0, 1) for i in jobs.queued(shard, "local")}
    assert queued == {ids[0], ids[1]}  # a job now for mail never tried, the deferred one back to its retry time
    assert [m.decode() for m in connect(settings).lrange(jobs.settle_key(mail[2].shard), 0, -1)] == [
        f"{ids[2]}:local"]
    assert delivered(cluster.n2) == Counter() and cluster.n2.spooled() == []
    assert not (cluster.n1.settings().spool_root / "move.journal").exists()
    unknown = mover(cluster.n1, "queue", "move", ids[0], "--to", "n9")
    assert unknown.returncode == 69 and "no node 'n9' in the cluster's registry" in unknown.stderr
    itself = mover(cluster.n1, "shards", "move", "n1/s0", "--to", "n1")
    assert itself.returncode == 64 and "is this node" in itself.stderr
    elsewhere = mover(cluster.n1, "shards", "move", "n2/s0", "--to", "n2")
    assert elsewhere.returncode == 64 and "run the move there" in elsewhere.stderr
    closed = mover(cluster.n1, "queue", "move", ids[0], "--to", "n2", "--qmqp", f"127.0.0.1:{free_port()}")
    assert closed.returncode == 75 and sorted(cluster.n1.spooled()) == sorted(ids[:3])


def test_a_shard_moved_while_its_own_pool_delivers_gives_each_recipient_one_copy(
        node_factory: Callable[..., Node]) -> None:
    """The mover and n1's local pool race for one shard: what the mover takes out is held (the
    pool's claims waited for), so every recipient gets one copy, from one node or the other."""
    cluster = two_nodes(node_factory)
    assert cluster.n1.command("shards", "drain", "1").returncode == 0  # all the mail into s0
    count = 400
    mail = queue_mail(cluster.n1, [[f"r{i}@test.example"] for i in range(count)])
    assert {e.shard for e in mail} == {0}
    assert cluster.n1.command("shards", "drain", "0").returncode == 0  # the move starts at once
    move = subprocess.Popen([sys.executable, "-m", "ops.cli", "shards", "move", "n1/s0", "--to", "n2"],
                            env=cluster.n1.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: len(delivered(cluster.n2)) >= 20, timeout=30, what="the move under way")
    start(cluster.n1, "worker", "local")  # and now the pool too
    out, err = move.communicate(timeout=120)
    assert move.returncode == 0, out + err
    moved = int(out.splitlines()[-1].split("moved ")[1].split(",")[0])
    wait_until(lambda: sum((delivered(cluster.n1) + delivered(cluster.n2)).values()) >= count
               and cluster.n1.spooled() == [] and cluster.n2.spooled() == [], timeout=60,
               what="every message delivered on one node or the other")
    copies = delivered(cluster.n1) + delivered(cluster.n2)
    assert set(copies) == {f"r{i}@test.example" for i in range(count)} and max(copies.values()) == 1
    assert sum(delivered(cluster.n2).values()) == moved  # what moved was delivered there, the rest here
    assert traces(cluster.n1, {e.id for e in mail}) == set()


def test_the_journal_survives_a_torn_line_and_one_mover_runs_at_a_time(node_factory: Callable[..., Node]) -> None:
    node = node_factory(node="n1")
    root = node.settings().spool_root
    root.mkdir(parents=True, exist_ok=True)
    (root / "move.journal").write_bytes(b'{"id":"A","state":"sending","shard":0}\n{"id":"A","sta')  # killed mid-write
    journal = Journal(root)
    journal.open()
    assert journal.states["A"]["state"] == "sending"  # the torn step did not happen
    journal.write("A", "sent", new="B")
    result = mover(node, "queue", "move", "0123456789ABCDEF0123456789", "--to", "n2", "--qmqp", "127.0.0.1:1")
    assert result.returncode == 75 and "another move is running on this node" in result.stderr
    journal.close()
    again = Journal(root)
    again.open()
    assert again.states["A"]["state"] == "sent" and again.states["A"]["new"] == "B"
    again.close()


class ReplyLost:
    """A QMQP hop that hands each request on to the real server and drops its verdict: the K
    that never arrives (a network cut just after the target committed)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.verdicts: list[Reply] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            with client:
                chunks = []
                while chunk := client.recv(65536):
                    chunks.append(chunk)
                self.verdicts.append(send("127.0.0.1", self.port, b"".join(chunks), 10))

    def close(self) -> None:
        self.sock.close()


def test_a_lost_verdict_keeps_the_message_held_and_the_rerun_makes_no_second_copy(
        node_factory: Callable[..., Node]) -> None:
    cluster = two_nodes(node_factory)
    mail, wanted = the_mail(cluster)
    ids = [e.id for e in mail]
    hop = ReplyLost(cluster.qmqp_port)
    try:
        cut = mover(cluster.n1, "queue", "move", *ids, "--to", "n2", "--qmqp", hop.address)
    finally:
        hop.close()
    assert cut.returncode == 75, cut.stdout + cut.stderr
    assert cut.stdout.splitlines()[-1] == "move to n2: moved 0, left 4 (temporary), refused 0"
    assert "no verdict from n2 once it was sent" in cut.stderr
    assert len(hop.verdicts) == 4 and all(v.accepted for v in hop.verdicts)  # n2 took them all
    assert cluster.n1.spooled() == []  # all kept on hold here: not delivered by n1 meanwhile
    assert sorted(e.id for e, _ in held_on(cluster.n1)) == sorted(ids)
    again = mover(cluster.n1, "queue", "move", *ids, "--to", "n2")
    assert again.returncode == 0, again.stdout + again.stderr
    assert {line.split(" as ")[-1].split()[0] for line in again.stdout.splitlines()[:-1]} == {
        v.text.removeprefix("ok ") for v in hop.verdicts}  # the ids n2 gave the first time
    assert_moved_once(cluster, ids, wanted, doubled=set())
