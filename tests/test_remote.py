"""The remote delivery pool against real peers on loopback: a real DNS server (unbound) for the MX
records, aiosmtpd sinks, Postfix's smtp-sink with its fault options, and a peer that hangs. The pool
runs as a real ``shardmail worker remote`` process; messages enter through the front door."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable

import pytest
from rq import Worker
from rq.registry import StartedJobRegistry

from core.envelope import Envelope, Mark
from core.jobs import Jobs
from core.redis_conn import connect
from core.shards import Namespace
from core.submit import Draft, Submitter
from tests.conftest import Node
from tests.dns_server import DnsServer, standard_zone
from tests.smtp_peers import PostfixSink, Silent, Sink, TlsPair
from tests.support import wait_until
from workers.smtp_client import wire_data

BODY = b"Subject: remote test\r\nFrom: <a@example.net>\r\n\r\nline one\r\n.leading dot\r\n..two dots\r\nend\r\n"


class Rig:
    """A node configured for remote delivery (DNS on loopback, short timeouts), its front door,
    and its remote pool processes."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.settings = node.settings()
        self.submitter = Submitter(self.settings, connect(self.settings))
        self.jobs = Jobs(connect(self.settings), Namespace.of(self.settings))

    def send(self, recipients: list[str], body: bytes = BODY, sender: str = "a@example.net",
             smtputf8: bool = False) -> Envelope:
        return self.submitter.accept(Draft(self.submitter.new_id(), sender, recipients, body, smtputf8=smtputf8))

    def start(self, **env: str) -> subprocess.Popen[bytes]:
        """The pool as a real process; the node stops it (SIGTERM) with its other processes."""
        self.log = self.node.var_dir.parent / f"remote-{len(self.node.procs)}.log"
        with open(self.log, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "ops.cli", "worker", "remote"],
                                    env=dict(self.node.env, **env), stdout=out, stderr=subprocess.STDOUT)
        self.node.procs.append(proc)
        return proc

    def states(self, envelope: Envelope) -> list[Mark | None] | None:
        """Each recipient's latest mark; None once the message has left the spool."""
        try:
            return self.submitter.map.spool(envelope.shard).read(envelope.id).states()
        except FileNotFoundError:
            return None

    def settled(self, envelope: Envelope) -> bool:
        states = self.states(envelope)
        return states is None or all(m is not None for m in states)

    def wait_settled(self, envelopes: list[Envelope], timeout: float = 30.0) -> None:
        wait_until(lambda: all(self.settled(e) for e in envelopes), timeout, "every recipient attempted")

    def jobs_idle(self) -> bool:
        """Every remote job finished: queues empty, nothing left in the started registries."""
        for shard in range(self.settings.shards):
            queue = self.jobs.queue(shard, "remote")
            if queue.count or StartedJobRegistry(queue=queue).count:
                return False
        return True


@pytest.fixture
def rig_factory(node_factory: Callable[..., Node], dns_server: DnsServer) -> Callable[..., Rig]:
    def factory(dns: DnsServer = dns_server, **overrides: str) -> Rig:
        settings = {"dnsresolvers": dns.hostport, "dnstimeout": "2", "timeoutremote": "10", "reuseidle": "2",
                    **overrides}
        return Rig(node_factory(**settings))

    return factory


def states_text(states: list[Mark | None] | None) -> list[tuple[str, str]]:
    assert states is not None
    return [(m.state, m.status) if m else ("none", "") for m in states]


def test_bytes_at_the_sink_are_the_spooled_message_and_the_connection_is_reused(
        rig_factory: Callable[..., Rig], sink_factory: Callable[..., Sink]) -> None:
    sink = sink_factory("127.0.1.1")
    rig = rig_factory(concurrencydestination="1")
    bodies = [BODY, b"Subject: bare\r\n\r\nbare LF\nand bare CR\rhere\r\n", b"Subject: x\r\n\r\nno final newline",
              b".starts with a dot\r\n\r\nbody\r\n"]
    envelopes = [rig.send([f"user{i}@d1.test"], body) for i, body in enumerate(bodies)]
    rig.start()
    transactions = sink.wait_for(len(bodies))
    wait_until(lambda: rig.node.spooled() == [] and rig.jobs_idle(), 20, "spool and queues empty")
    by_rcpt = {t.recipients[0]: t for t in transactions}
    for i, (envelope, body) in enumerate(zip(envelopes, bodies, strict=True)):
        data = by_rcpt[f"user{i}@d1.test"].data
        # the sink's bytes are the spooled bytes, line ends made CRLF (aiosmtpd un-stuffs the dots)
        expected = wire_data(body)[:-3].replace(b"\r\n..", b"\r\n.")
        assert data == (expected[1:] if body.startswith(b".") else expected), envelope.id
        assert data.count(b"\n") == data.count(b"\r\n") == data.count(b"\r")  # no bare CR or LF
        assert by_rcpt[f"user{i}@d1.test"].sender == "a@example.net"
    assert by_rcpt["user0@d1.test"].data == BODY
    assert sink.connections == 1  # one destination, one session at a time: every message on one connection


def test_each_recipient_gets_its_own_outcome_in_one_transaction_per_domain(
        rig_factory: Callable[..., Rig], sink_factory: Callable[..., Sink]) -> None:
    d2 = sink_factory("127.0.1.2", rcpt_replies={"bad@d2.test": "550 5.1.1 no such user",
                                                 "later@d2.test": "451 4.2.1 try later"})
    d3 = sink_factory("127.0.1.3")
    rig = rig_factory()
    envelope = rig.send(["ok1@d2.test", "bad@d2.test", "later@d2.test", "ok2@d3.test", "ok3@d2.test"])
    rig.start()
    rig.wait_settled([envelope])
    assert states_text(rig.states(envelope)) == [("delivered", "2.0.0"), ("failed", "5.1.1"), ("deferred", "4.2.1"),
                                                 ("delivered", "2.0.0"), ("delivered", "2.0.0")]
    assert [t.recipients for t in d2.transactions] == [["ok1@d2.test", "ok3@d2.test"]]  # one transaction
    assert [t.recipients for t in d3.transactions] == [["ok2@d3.test"]]
    failed = rig.states(envelope)[1]  # type: ignore[index]
    assert failed is not None and "no such user" in failed.text and "127.0.1.2" in failed.text
    wait_until(rig.jobs_idle, 10, "job finished")
    assert rig.node.spooled() == [envelope.id]  # the deferred recipient keeps it queued for the retry


# (smtp-sink options, expected state and status class of its recipient)
FAULTS = [
    (("-r", "connect"), "deferred"), (("-Q", "connect"), "deferred"), (("-r", "ehlo"), "deferred"),
    (("-f", "ehlo"), "delivered"), (("-e",), "delivered"),  # EHLO refused or unknown: HELO, and the mail goes
    (("-r", "mail"), "deferred"), (("-f", "mail"), "failed"), (("-Q", "mail"), "deferred"),
    (("-r", "rcpt"), "deferred"), (("-f", "rcpt"), "failed"),
    (("-r", "data"), "deferred"), (("-f", "data"), "failed"),
    (("-r", "."), "deferred"), (("-f", "."), "failed"), (("-q", "."), "deferred"), (("-Q", "."), "deferred"),
    ((), "delivered"), (("-p",), "delivered"),  # with and without PIPELINING
]


def test_faults_at_each_stage_touch_only_the_affected_recipients(
        rig_factory: Callable[..., Rig], postfix_sink_factory: Callable[..., PostfixSink],
        sink_factory: Callable[..., Sink]) -> None:
    good = sink_factory("127.0.1.50")
    sinks = {n: postfix_sink_factory(f"127.0.1.{n}", *options) for n, (options, _) in enumerate(FAULTS, start=10)}
    rig = rig_factory(timeoutremote="5")
    envelopes = {n: rig.send([f"x@d{n}.test", f"y{n}@d50.test"]) for n in sinks}
    rig.start()
    rig.wait_settled(list(envelopes.values()))
    for n, (options, expected) in enumerate(FAULTS, start=10):
        states = rig.states(envelopes[n])
        if states is None:
            assert expected == "delivered", options
            continue
        mark = states[0]
        assert mark is not None and mark.state == expected, (options, mark)
        assert mark.status[0] == {"deferred": "4", "failed": "5", "delivered": "2"}[expected], (options, mark)
        assert states[1] is not None and states[1].state == "delivered", (options, states[1])  # the other peer
        reached = expected == "delivered" or "." in options  # the sink dumps all it read, even when it refuses "."
        assert sinks[n].accepted() == (1 if reached else 0), options
    assert sorted(good.recipients()) == sorted(f"y{n}@d50.test" for n in sinks)
    dropped = rig.states(envelopes[10 + FAULTS.index((("-q", "."), "deferred"))])
    assert dropped is not None and dropped[0] is not None and "may be delivered twice" in dropped[0].text


def test_first_mail_exchangers_refusing_then_the_backup_takes_it(
        rig_factory: Callable[..., Rig], sink_factory: Callable[..., Sink]) -> None:
    backup = sink_factory("127.0.0.13")  # multi.test: mx1 (127.0.0.11, ::1) and mx2 (127.0.0.12) listen on nothing
    rig = rig_factory()
    envelope = rig.send(["someone@multi.test"])
    rig.start()
    backup.wait_for(1)
    wait_until(lambda: rig.states(envelope) is None, 10, "delivered and removed")
    assert backup.recipients() == ["someone@multi.test"]


def test_dns_answers_decide_permanent_and_temporary(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory()
    envelope = rig.send(["a@nx.test", "b@nullmx.test", "c@servfail.test", "d@dangling.test"])
    rig.start()
    rig.wait_settled([envelope])
    assert states_text(rig.states(envelope)) == [("failed", "5.1.2"), ("failed", "5.1.10"), ("deferred", "4.4.3"),
                                                 ("failed", "5.4.4")]


def test_smtputf8_is_never_downgraded_and_idna_domains_go_out_as_a_labels(
        rig_factory: Callable[..., Rig], sink_factory: Callable[..., Sink]) -> None:
    plain = sink_factory("127.0.1.4", smtputf8=False)
    utf8 = sink_factory("127.0.1.5")
    idna = sink_factory("127.0.0.31", smtputf8=False)  # bücher.test
    rig = rig_factory()
    needs = rig.send(["jürgen@d4.test", "jürgen@d5.test"], smtputf8=True)
    ascii_local = rig.send(["hans@bücher.test"], smtputf8=True)
    rig.start()
    rig.wait_settled([needs, ascii_local])
    states = rig.states(needs)
    assert states is not None and states[0] is not None and (states[0].state, states[0].status) == ("failed", "5.6.7")
    assert states[1] is not None and states[1].state == "delivered"
    assert plain.transactions == []
    assert utf8.transactions[0].recipients == ["jürgen@d5.test"] and "SMTPUTF8" in utf8.transactions[0].mail_options
    idna.wait_for(1)
    assert idna.transactions[0].recipients == ["hans@xn--bcher-kva.test"]
    assert "SMTPUTF8" not in idna.transactions[0].mail_options


def test_size_limit_and_8bitmime(rig_factory: Callable[..., Rig], sink_factory: Callable[..., Sink]) -> None:
    small = sink_factory("127.0.1.6", size_limit=2000)
    rig = rig_factory()
    big = rig.send(["a@d6.test"], b"Subject: big\r\n\r\n" + b"x" * 70 + b"\r\n" * 1 + b"y" * 5000 + b"\r\n")
    eight = rig.send(["b@d6.test"], "Subject: 8bit\r\n\r\nGrüße\r\n".encode())
    rig.start()
    rig.wait_settled([big, eight])
    states = rig.states(big)
    assert states is not None and states[0] is not None and (states[0].state, states[0].status) == ("failed", "5.3.4")
    small.wait_for(1)
    assert [t.recipients for t in small.transactions] == [["b@d6.test"]]  # the big one was never sent
    assert "BODY=8BITMIME" in small.transactions[0].mail_options
    assert any(o.startswith("SIZE=") for o in small.transactions[0].mail_options)


def _tls_dns(dns_server_factory: Callable[..., DnsServer]) -> DnsServer:
    zone = standard_zone()
    zone.mx("tls.test", 10, "mx.tls.test", "127.0.0.51")
    return dns_server_factory(zone)


def test_opportunistic_starttls(rig_factory: Callable[..., Rig], sink_factory: Callable[..., Sink],
                                dns_server_factory: Callable[..., DnsServer], tls_pair: TlsPair) -> None:
    sink = sink_factory("127.0.0.51", tls_context=tls_pair.server_context())
    rig = rig_factory(dns=_tls_dns(dns_server_factory))
    rig.send(["a@tls.test"])
    rig.start()
    assert sink.wait_for(1)[0].tls


@pytest.mark.parametrize("trusted", [True, False])
def test_verified_tls(rig_factory: Callable[..., Rig], sink_factory: Callable[..., Sink],
                      dns_server_factory: Callable[..., DnsServer], tls_pair: TlsPair, trusted: bool) -> None:
    sink = sink_factory("127.0.0.51", tls_context=tls_pair.server_context())
    rig = rig_factory(dns=_tls_dns(dns_server_factory), tlsremote="verify",
                      tlscafile=str(tls_pair.cert) if trusted else "")
    envelope = rig.send(["a@tls.test"])
    rig.start()
    rig.wait_settled([envelope])
    states = rig.states(envelope)
    if trusted:  # delivered: marked, then removed from the spool a moment later
        assert states is None or [(m.state if m else None) for m in states] == ["delivered"]
        wait_until(lambda: rig.states(envelope) is None, 10, "the delivered message removed")
        assert sink.transactions[0].tls
    else:
        assert states is not None and states[0] is not None and (states[0].state, states[0].status) == (
            "deferred", "4.7.5")
        assert sink.transactions == []


def test_per_destination_limit_holds_and_is_reached(
        rig_factory: Callable[..., Rig], sink_factory: Callable[..., Sink]) -> None:
    sink = sink_factory("127.0.1.7", data_delay=0.3)
    rig = rig_factory(concurrencydestination="4", concurrencyremote="50")
    envelopes = [rig.send([f"u{i}@d7.test"]) for i in range(24)]
    rig.start()
    sink.wait_for(24)
    rig.wait_settled(envelopes)
    assert sink.peak_open == 4  # never more than the limit, and the limit was used
    assert sink.connections <= 8  # connections were reused, not opened per message


def test_a_hanging_peer_holds_only_its_own_sessions(
        rig_factory: Callable[..., Rig], sink_factory: Callable[..., Sink],
        silent_factory: Callable[..., Silent]) -> None:
    hung = silent_factory("127.0.1.8")
    fast = [sink_factory(f"127.0.1.{n}") for n in range(9, 19)]
    timeout = 4
    rig = rig_factory(concurrencyremote="30", concurrencydestination="20", timeoutremote=str(timeout))
    stuck = [rig.send([f"u{i}@d8.test"]) for i in range(50)]  # queued first: ahead of everything else
    flowing = [rig.send([f"u{i}@d{n}.test"]) for i in range(10) for n in range(9, 19)]
    started = time.monotonic()
    rig.start()
    for sink in fast:
        sink.wait_for(10, timeout=timeout)  # all of it, before the hung sessions could even time out
    others_done = time.monotonic() - started
    assert hung.accepted == 20  # the hung domain had its 20 sessions, no more
    rig.wait_settled(stuck, timeout=timeout + 15)
    for envelope in stuck:
        states = rig.states(envelope)
        assert states is not None and states[0] is not None and states[0].state == "deferred"
    assert any("timed out" in (rig.states(e) or [None])[0].text for e in stuck)  # type: ignore[union-attr]
    assert all(rig.states(e) is None for e in flowing)
    assert others_done < timeout, others_done
    # the hung sessions gave their slots back: new mail to the other domains still flows
    more = [rig.send([f"v{n}@d{n}.test"]) for n in range(9, 19)]
    wait_until(lambda: all(rig.states(e) is None for e in more), 10, "later mail delivered")


def test_stop_gives_unfinished_jobs_back(rig_factory: Callable[..., Rig], silent_factory: Callable[..., Silent]
                                         ) -> None:
    hung = silent_factory("127.0.1.20")
    rig = rig_factory(concurrencydestination="2", timeoutremote="60")
    envelopes = [rig.send([f"u{i}@d20.test"]) for i in range(10)]
    proc = rig.start()
    wait_until(lambda: hung.accepted == 2 and rig.jobs_idle() is False and all(
        rig.jobs.queue(s, "remote").count == 0 for s in range(rig.settings.shards)), 15, "all claimed, two hung")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    waiting = {j for s in range(rig.settings.shards) for j in rig.jobs.queue(s, "remote").get_job_ids()}
    assert waiting == {f"n1-{e.id}-remote" for e in envelopes}
    assert all(StartedJobRegistry(queue=rig.jobs.queue(s, "remote")).count == 0 for s in range(rig.settings.shards))
    assert sorted(rig.node.spooled()) == sorted(e.id for e in envelopes)


def test_pool_is_listed_in_rqs_worker_registry(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory()
    rig.start()
    conn = connect(rig.settings)
    wait_until(lambda: any(q.endswith(".remote") for w in Worker.all(connection=conn) for q in w.queue_names()),
               15, "remote pool registered")


def test_engine_forgets_idle_destinations_and_closes_idle_connections(
        rig_factory: Callable[..., Rig], sink_factory: Callable[..., Sink]) -> None:
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from workers.remote import RemoteEngine

    sinks = [sink_factory(f"127.0.1.{n}") for n in (31, 32, 33)]
    rig = rig_factory(reuseidle="3")  # long enough to see them parked on a loaded machine
    envelopes = [rig.send([f"u@d{n}.test"]) for n in (31, 32, 33) for _ in range(3)]
    claims = [c for s in range(rig.settings.shards) for c in rig.jobs.claim(s, "remote", 100, "test")]
    done: list[object] = []

    async def run() -> RemoteEngine:
        with ThreadPoolExecutor(2) as io:
            engine = RemoteEngine(rig.settings, rig.submitter.map, done.append, io)
            for claim in claims:
                engine.add(claim, rig.submitter.map.spool(claim.shard).read(claim.message_id))
            while len(done) < len(claims):
                await asyncio.sleep(0.02)
            assert set(engine.destinations) == {"d31.test", "d32.test", "d33.test"}  # parked connections
            while engine.destinations:
                await asyncio.sleep(0.05)
            await engine.stop(1)
            return engine

    engine = asyncio.run(asyncio.wait_for(run(), 20))
    assert engine.in_memory == 0 and engine.active == 0
    assert all(rig.states(e) is None for e in envelopes)
    assert all(1 <= s.connections <= 3 for s in sinks)  # parallel sessions, then parked
    wait_until(lambda: all(s.open_now == 0 for s in sinks), 5, "idle connections closed with QUIT")


def test_a_failed_tls_handshake_falls_back_to_plain_text(
        rig_factory: Callable[..., Rig], sink_factory: Callable[..., Sink],
        dns_server_factory: Callable[..., DnsServer], tls_pair: TlsPair) -> None:
    import ssl

    context = tls_pair.server_context()
    context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers("AES128-SHA")  # a TLS 1.2 server offering only a cipher our client refuses: no handshake
    sink = sink_factory("127.0.0.51", tls_context=context)
    rig = rig_factory(dns=_tls_dns(dns_server_factory))
    envelope = rig.send(["a@tls.test"])
    rig.start()
    transaction = sink.wait_for(1)[0]
    assert not transaction.tls  # "may": after the failed handshake, a new connection without STARTTLS
    assert sink.connections == 2
    wait_until(lambda: rig.states(envelope) is None, 10, "delivered and removed")
