"""``shardmail queue`` against real queued mail: a real spool and redis-server, real ``shardmail``
processes (scheduler, remote and local pools), a real DNS server and SMTP sinks on loopback. Each
command runs as the real CLI; its output is checked on known queue contents."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from rq.registry import FailedJobRegistry, StartedJobRegistry

from core.envelope import Envelope, Mark, Recipient
from core.jobs import Jobs, job_id
from core.redis_conn import connect
from core.shards import Namespace, ShardMap
from core.submit import Draft, Submitter
from tests.conftest import CATCHALL_LDIF, Node, RedisServer
from tests.dns_server import DnsServer
from tests.smtp_peers import Sink
from tests.support import read_log, wait_until

BODY = b"From: <a@example.net>\r\nSubject: queue admin\r\n\r\nthe body line\r\n"
DAY = 86400.0


class Rig:
    """A node, its front door and its Redis structures."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.settings = node.settings()
        self.conn = connect(self.settings)
        self.submitter = Submitter(self.settings, self.conn)
        self.jobs = Jobs(self.conn, Namespace.of(self.settings))
        self.map = ShardMap(self.settings)

    def send(self, recipients: list[str], sender: str = "a@example.net", body: bytes = BODY) -> Envelope:
        return self.submitter.accept(Draft(self.submitter.new_id(), sender, recipients, body))

    def queue(self, *args: str, stdin: str = "") -> tuple[int, str, str]:
        result = self.node.command("queue", *args, input=stdin.encode())
        return result.returncode, result.stdout.decode(), result.stderr.decode()

    def start(self, *args: str, **env: str) -> subprocess.Popen[bytes]:
        log = self.node.var_dir.parent / f"{args[0]}-{len(self.node.procs)}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "ops.cli", *args], env=dict(self.node.env, **env),
                                    stdout=out, stderr=subprocess.STDOUT)
        self.node.procs.append(proc)
        return proc

    def where(self, envelope: Envelope) -> str | None:
        return self.map.spool(envelope.shard).where(envelope.id)

    def doorbells(self, envelope: Envelope) -> list[str]:
        """Every trace of the message in Redis: queued jobs, claims, retry entries, failed jobs."""
        found = []
        for channel in ("local", "remote"):
            queue = self.jobs.queue(envelope.shard, channel)
            ident = job_id(self.jobs.space, envelope.id, channel)
            if ident.encode() in self.conn.lrange(queue.key, 0, -1):
                found.append(f"queued {channel}")
            if any(m.decode().startswith(ident) for m in self.conn.zrange(StartedJobRegistry(queue=queue).key, 0, -1)):
                found.append(f"claimed {channel}")
            if self.conn.zscore(FailedJobRegistry(queue=queue).key, ident) is not None:
                found.append(f"failed {channel}")
            if self.conn.zscore(self.jobs.retry_key(envelope.shard), f"{envelope.id}:{channel}") is not None:
                found.append(f"retry {channel}")
        return found


def remote_rig(node_factory: Callable[..., Node], dns: DnsServer, **overrides: str) -> Rig:
    return Rig(node_factory(dnsresolvers=dns.hostport, dnstimeout="2", timeoutremote="10", reuseidle="1",
                            **overrides))


def test_list_and_show_on_known_queue_contents(node_factory: Callable[..., Node]) -> None:
    rig = Rig(node_factory())  # no pools run: the queue stays as it is made here
    first = rig.send(["x@far.example", "y@near.example"])
    at = time.time()
    rig.map.spool(first.shard).mark(first.id, [Mark(0, "deferred", "4.2.1", "451 4.2.1 mailbox busy", at)])
    second = rig.send(["z@far.example"], sender="", body=BODY + b"more\r\n" * 10)
    third = rig.send(["w@far.example"])
    code, out, err = rig.queue("hold", third.id)
    assert (code, out.strip()) == (0, f"{third.id}: held"), err

    code, out, err = rig.queue("list")
    assert code == 0, err
    lines = out.splitlines()
    heads = {line.split()[0]: line.split() for line in lines if not line.startswith((" ", "--"))}
    assert set(heads) == {first.id, second.id, f"{third.id}!"}
    assert heads[first.id][1:3] == [f"s{first.shard}", str(len(BODY))]
    assert heads[first.id][-1] == "<a@example.net>" and heads[second.id][-1] == "<>"
    assert heads[second.id][2] == str(len(BODY) + 60)
    block = lines[lines.index(next(line for line in lines if line.startswith(first.id))):][:3]
    assert block[1].split()[:4] == ["<x@far.example>", "deferred", "4.2.1", "451"] and "mailbox busy" in block[1]
    assert block[2].split() == ["<y@near.example>", "ready"]
    assert lines[-1] == (f"-- 3 message(s), {3 * len(BODY) + 60} B, 4 recipient(s) waiting; "
                         "1 held (!), 0 in flight (*)")

    code, out, _ = rig.queue("list", "--domain", "NEAR.example")
    assert [line.split()[0] for line in out.splitlines() if not line.startswith(" ")][:-1] == [first.id]
    code, out, _ = rig.queue("list", "--held")
    assert out.splitlines()[0].startswith(f"{third.id}!") and "1 message(s)" in out.splitlines()[-1]
    code, out, _ = rig.queue("list", "--shard", str(second.shard))
    listed = {line.split()[0].rstrip("!") for line in out.splitlines() if not line.startswith((" ", "--"))}
    assert listed == {e.id for e in (first, second, third) if e.shard == second.shard}
    code, out, _ = rig.queue("list", "--json")
    doc = json.loads(out)
    assert doc["total"] == {"messages": 3, "held": 1, "active": 0, "size": 3 * len(BODY) + 60, "recipients": 4}
    by_id = {m["id"]: m for m in doc["messages"]}
    assert by_id[third.id]["held"] is True and by_id[first.id]["held"] is False
    assert by_id[first.id]["recipients"][0] == {"address": "x@far.example", "channel": "remote", "state": "deferred",
                                                "status": "4.2.1", "reason": "451 4.2.1 mailbox busy",
                                                "at": round(at, 3)}
    assert by_id[first.id]["recipients"][1] == {"address": "y@near.example", "channel": "remote", "state": "ready"}

    code, out, err = rig.queue("show", first.id)
    assert code == 0, err
    assert out.startswith(f"*** envelope of {first.id} (shard {first.shard}, queued)\n")
    assert "sender: <a@example.net>" in out and f"size: {len(BODY)} bytes" in out
    assert "0: <x@far.example> via remote: deferred" in out and "1: <y@near.example> via remote: ready" in out
    assert re.search(r"\*\*\* marks\n\S+ \S+ <x@far.example> deferred 4.2.1 451 4.2.1 mailbox busy\n", out)
    assert out.endswith("*** headers\nFrom: <a@example.net>\nSubject: queue admin\n")
    code, out, _ = rig.queue("show", "--body", third.id)
    assert "(shard" in out and "on hold)" in out and out.endswith("*** body\nthe body line\n")

    # unknown ids: said so, exit 1, and the known ones are still shown
    code, out, err = rig.queue("show", "0123456789ABCDEF0123456789", second.id, "../../etc/passwd")
    assert code == 1 and f"*** envelope of {second.id}" in out
    assert "0123456789ABCDEF0123456789: no such message in the queue" in err
    assert "../../etc/passwd: no such message in the queue" in err
    assert rig.queue("release", "0123456789ABCDEF0123456789")[0] == 1
    assert rig.queue("show")[0] == 64  # no ids at all: usage

    # ids from stdin, as `queue list` prints them (the recipient and total lines are skipped)
    _, listing, _ = rig.queue("list")
    code, out, _ = rig.queue("hold", "-", stdin=listing)
    assert code == 0
    assert sorted(out.splitlines()) == sorted([f"{first.id}: held", f"{second.id}: held",
                                               f"{third.id}: already on hold"])


def test_held_mail_is_never_delivered_until_released_then_once(
        node_factory: Callable[..., Node], dns_server: DnsServer, sink_factory: Callable[..., Sink]) -> None:
    sink = sink_factory("127.0.1.44")
    rig = remote_rig(node_factory, dns_server, sweepinterval="1")
    messages = [rig.send([f"u{i}@d44.test"]) for i in range(8)]
    held = messages[:3]
    code, out, err = rig.queue("hold", *(e.id for e in held))
    assert code == 0 and out.count(": held") == 3, err
    for envelope in held:
        assert rig.where(envelope) == "hold" and rig.doorbells(envelope) == []
    rig.start("scheduler")
    pool = rig.start("worker", "remote")
    wait_until(lambda: len(sink.transactions) >= 5, 30, "the others delivered")
    wait_until(lambda: rig.node.spooled() == [], 20, "their entries removed")
    pool.send_signal(signal.SIGTERM)
    pool.wait(20)
    # Redis forgets everything, and two more messages are in the spool alone; recover and the
    # scheduler's sweeps (its leases are taken afresh) rebuild the queue from the spool
    rig.conn.flushall()
    more = [rig.send([f"v{i}@d44.test"]) for i in range(2)]
    rig.conn.flushall()
    result = rig.node.command("recover")
    assert result.returncode == 0 and "recover: 2 messages in 2 shards" in result.stderr.decode(), result.stderr
    rig.start("worker", "remote")
    wait_until(lambda: len(sink.transactions) >= 7, 30, "recovered mail delivered")
    wait_until(lambda: rig.node.spooled() == [], 20, "queue/ empty")
    assert sorted(sink.recipients()) == sorted([f"u{i}@d44.test" for i in range(3, 8)] + ["v0@d44.test",
                                                                                          "v1@d44.test"])
    for envelope in held:
        assert rig.where(envelope) == "hold" and rig.doorbells(envelope) == []
    assert more  # (delivered above)

    _, listing, _ = rig.queue("list", "--held")
    code, out, err = rig.queue("release", "-", stdin=listing)
    assert code == 0, err
    assert sorted(out.splitlines()) == sorted(f"{e.id}: released (queued for remote)" for e in held)
    wait_until(lambda: len(sink.transactions) >= 10, 30, "released mail delivered")
    wait_until(lambda: all(rig.where(e) is None for e in held), 20, "released mail gone from the spool")
    copies = Counter(sink.recipients())
    assert set(copies) == {f"u{i}@d44.test" for i in range(8)} | {"v0@d44.test", "v1@d44.test"}
    assert max(copies.values()) == 1
    assert rig.queue("list")[1].strip() == "-- the queue is empty"


def test_hold_waits_for_an_attempt_in_flight_or_forces(
        node_factory: Callable[..., Node], dns_server: DnsServer, sink_factory: Callable[..., Sink]) -> None:
    # each attempt lasts long enough for two commands to run during it, even on a loaded machine
    sink = sink_factory("127.0.1.45", data_delay=4.0, data_reply="451 4.3.0 try again later")
    rig = remote_rig(node_factory, dns_server)
    slow = rig.send(["u@d45.test"])
    pool = rig.start("worker", "remote")
    wait_until(lambda: rig.doorbells(slow) == ["claimed remote"], 20, "the attempt in flight")
    code, out, err = rig.queue("hold", slow.id, "--wait", "0.2")
    assert code == 75 and "in flight" in err and rig.where(slow) == "queue"
    _, listing, _ = rig.queue("list")
    assert listing.startswith(f"{slow.id}*")  # flagged as being delivered
    code, out, err = rig.queue("hold", slow.id)  # waits for the attempt to end, then holds
    assert (code, out.strip()) == (0, f"{slow.id}: held"), err
    held = rig.map.spool(slow.shard).peek(slow.id, held=True)
    assert [(m.state, m.status) for m in held.marks] == [("deferred", "4.3.0")]  # the attempt's outcome kept
    assert len(sink.transactions) == 1

    # --force holds at once: that attempt's checkpoint finds no file and the pool just goes on
    forced = rig.send(["v@d45.test"])
    wait_until(lambda: rig.doorbells(forced) == ["claimed remote"], 20, "the second attempt in flight")
    code, out, err = rig.queue("hold", "--force", forced.id)
    assert code == 0 and "its outcome is not recorded" in out, err
    wait_until(lambda: rig.doorbells(forced) == [], 20, "the forced attempt over")
    assert rig.map.spool(forced.shard).peek(forced.id, held=True).marks == ()
    assert pool.poll() is None and "Traceback" not in read_log(rig.node.var_dir.parent / "worker-0.log")

    # released: attempted again at once, and accepted this time
    assert len(sink.transactions) == 2  # the two deferred attempts
    sink.data_reply, sink.data_delay = "", 0.0
    code, out, err = rig.queue("release", slow.id, forced.id)
    assert code == 0, err
    wait_until(lambda: rig.where(slow) is None and rig.where(forced) is None, 20, "both delivered")
    assert Counter(r for t in sink.transactions[2:] for r in t.recipients) == {"u@d45.test": 1, "v@d45.test": 1}


def test_delete_removes_logs_and_takes_filters(node_factory: Callable[..., Node]) -> None:
    rig = Rig(node_factory())
    one = rig.send(["x@far.example", "y@near.example"])
    rig.map.spool(one.shard).mark(one.id, [Mark(1, "delivered", "2.0.0", "250 ok", time.time())])
    two = rig.send(["z@near.example"], sender="b@example.org")
    three = rig.send(["w@far.example"])
    four = rig.send(["v@far.example"])
    assert rig.queue("hold", four.id)[0] == 0
    code, out, err = rig.queue("delete", one.id)
    line = f"{one.id}: deleted (shard {one.shard}, from <a@example.net>, recipients pending: <x@far.example>)"
    assert (code, out.strip()) == (0, line), err
    assert f"shardmail.queue INFO {line}" in err  # logged as well as printed
    assert rig.where(one) is None and rig.doorbells(one) == []
    assert not rig.conn.exists(f"rq:job:n1-{one.id}-remote")

    assert rig.queue("delete", "ALL")[0] == 64  # not without --all
    assert rig.queue("delete", "ALL", two.id, "--all")[0] == 64
    assert rig.queue("delete", two.id, "--domain", "near.example")[0] == 64  # filters go with ALL only
    code, out, err = rig.queue("delete", "ALL", "--all", "--domain", "near.example")
    assert code == 0, err
    assert out.splitlines() == [f"{two.id}: deleted (shard {two.shard}, from <b@example.org>, recipients pending: "
                                f"<z@near.example>)", "-- 1 message(s) deleted"]
    code, out, _ = rig.queue("delete", "ALL", "--all", "--held")
    assert out.splitlines()[0].startswith(f"{four.id}: deleted (shard {four.shard}, on hold,")
    assert rig.where(four) is None and rig.where(three) == "queue" and rig.doorbells(three) == ["queued remote"]
    assert rig.queue("delete", one.id)[0] == 1  # gone already


def test_requeue_brings_back_a_job_from_rqs_failed_registry(node_factory: Callable[..., Node],
                                                            tmp_path: Path) -> None:
    users = tmp_path / "users.ldif"
    users.write_text(CATCHALL_LDIF + """
dn: mail=fwd@test.example,dc=test
objectClass: inetOrgPerson
objectClass: qmailUser
cn: fwd
sn: fwd
mail: fwd@test.example
mailMessageStore: fwd/
deliveryMode: nolocal
mailForwardingAddress: catchall@test.example
""")
    rig = Rig(node_factory(users_ldif=str(users), ldapmessagestore=str(tmp_path / "mail")))
    envelope = rig.send(["fwd@test.example"])
    failed = FailedJobRegistry(queue=rig.jobs.queue(envelope.shard, "local"))
    buggy = rig.start("worker", "local", SHARDMAIL_FAULT="spool.write=BUG")  # the forward's write raises
    wait_until(lambda: failed.count == 1, 20, "the job in rq's failed registry")
    buggy.send_signal(signal.SIGTERM)
    buggy.wait(15)
    assert rig.doorbells(envelope) == ["failed local"] and rig.where(envelope) == "queue"
    code, out, err = rig.queue("requeue", envelope.id)
    assert (code, out.strip()) == (0, f"{envelope.id}: requeued (queued for local)"), err
    assert rig.doorbells(envelope) == ["queued local"] and failed.count == 0
    rig.start("worker", "local")
    inbox = tmp_path / "mail" / "catchall" / "new"
    wait_until(lambda: rig.node.spooled() == [] and inbox.exists() and len(list(inbox.iterdir())) == 1, 30,
               "forwarded and delivered")


def test_flush_brings_deferred_mail_forward_by_domain(
        node_factory: Callable[..., Node], dns_server: DnsServer, sink_factory: Callable[..., Sink]) -> None:
    later = "451 4.2.1 try later"
    d46 = sink_factory("127.0.1.46", rcpt_replies={"u@d46.test": later})
    d47 = sink_factory("127.0.1.47", rcpt_replies={"u@d47.test": later})
    rig = remote_rig(node_factory, dns_server)
    first, second = rig.send(["u@d46.test"]), rig.send(["u@d47.test"])
    rig.start("scheduler")
    rig.start("worker", "remote")
    wait_until(lambda: all(rig.doorbells(e) == ["retry remote"] for e in (first, second)), 30, "both deferred")
    due = rig.conn.zscore(rig.jobs.retry_key(first.shard), f"{first.id}:remote")
    assert due > time.time() + 300  # qmail's schedule: the next attempt about 400 s after birth
    d46.rcpt_replies.clear()
    d47.rcpt_replies.clear()
    code, out, err = rig.queue("flush", "--domain", "d46.test")
    assert (code, out.strip()) == (0, "1 deferred message(s) due now: the scheduler releases them on its next "
                                      "pass"), err
    wait_until(lambda: rig.where(first) is None, 20, "the flushed domain delivered")
    assert d46.recipients() == ["u@d46.test"] and d47.transactions == [] and rig.where(second) == "queue"
    assert rig.doorbells(second) == ["retry remote"]
    code, out, _ = rig.queue("flush")
    assert out.startswith("1 deferred message(s) due now")
    wait_until(lambda: rig.where(second) is None, 20, "the rest delivered")
    assert d47.recipients() == ["u@d47.test"]


def test_hold_outlives_the_queue_lifetime_without_a_bounce(node_factory: Callable[..., Node]) -> None:
    rig = Rig(node_factory())
    birth = time.time() - 8 * DAY
    envelope = Envelope(rig.submitter.new_id(), "a@example.net", (Recipient("x@far.example", "remote"),), birth, 0,
                        len(BODY))
    spool = rig.map.spool(0)
    spool.write(envelope, BODY)
    spool.mark(envelope.id, [Mark(0, "deferred", "4.4.1", "timed out", birth + DAY)])
    assert rig.queue("hold", envelope.id)[0] == 0
    result = rig.node.command("recover")  # the sweep leaves hold/ alone: no bounce, no doorbell
    assert result.returncode == 0 and "0 messages" in result.stderr.decode()
    assert rig.where(envelope) == "hold" and rig.doorbells(envelope) == []
    code, out, _ = rig.queue("release", envelope.id)
    assert code == 0
    assert out.strip() == f"{envelope.id}: released (queued for remote)"  # one more attempt first, no bounce
    assert rig.where(envelope) == "queue" and rig.doorbells(envelope) == ["queued remote"]
    assert rig.node.spooled() == [envelope.id]  # nothing else, no bounce queued


def test_without_redis_list_works_and_hold_release_delete_stay_safe(node_factory: Callable[..., Node],
                                                                    own_redis: RedisServer) -> None:
    rig = Rig(node_factory(redis_url=own_redis.url))
    kept, dropped = rig.send(["x@far.example"]), rig.send(["y@far.example"])
    own_redis.stop()
    code, out, err = rig.queue("list")
    assert code == 0 and "2 message(s)" in out and "Redis unavailable" in err
    code, _, err = rig.queue("hold", kept.id)
    assert code == 75 and "not held" in err and rig.where(kept) == "queue"
    code, out, _ = rig.queue("hold", "--force", kept.id)
    assert code == 0 and rig.where(kept) == "hold"
    code, out, _ = rig.queue("release", kept.id)
    assert code == 75 and "next sweep" in out and rig.where(kept) == "queue"
    assert rig.queue("delete", dropped.id)[0] == 0 and rig.where(dropped) is None
    assert rig.queue("requeue", kept.id)[0] == 75 and rig.queue("flush")[0] == 75
