"""VERP: the address rule (pure), the envelope field, and the whole path on loopback: sendmail -V and
SMTP XVERP into the spool, a real remote pool process delivering one transaction per recipient to
aiosmtpd sinks on 127.0.1.38/39 (d38.test, d39.test of the test DNS server), and a permanent failure
bounced to the failed recipient's VERP address."""

from __future__ import annotations

import json
import smtplib
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from core.envelope import Envelope, Mark, Recipient, decode, encode
from core.redis_conn import connect
from core.submit import Draft, Submitter
from core.verp import qmail_form, valid_delimiters, verp_sender
from scheduler.bounce import DOUBLE_BOUNCE_SENDER, bounces
from scheduler.retry import Settler
from tests.conftest import Node
from tests.dns_server import DnsServer
from tests.slapd import Slapd
from tests.smtp_peers import Sink, Transaction
from tests.support import wait_until
from tests.test_local import make_rig
from tests.test_smtp_auth import Session, auth_node

MESSAGE = b"Subject: list mail\r\nFrom: <list@x.example>\r\n\r\nhello subscribers\r\n"
RECIPIENTS = ["ann@d38.test", "bob@d38.test", "cy@d39.test"]  # three remote recipients on two domains


# -- the rule (pure) ------------------------------------------------------------------------------
@pytest.mark.parametrize(("sender", "recipient", "delimiters", "expected"), [
    ("list@x.example", "user@domain.test", "+=", "list+user=domain.test@x.example"),  # Postfix's default
    ("list@x.example", "user@domain.test", "-=", "list-user=domain.test@x.example"),  # qmail's
    ("list@x.example", "user@domain.test", "+-", "list+user-domain.test@x.example"),
    ('""@x.example', "user@domain.test", "-=", "-user=domain.test@x.example"),  # empty prefix
    ('"my list"@x.example', "user@domain.test", "+=", '"my list+user=domain.test"@x.example'),
    ("list@x.example", '"john doe"@domain.test', "+=", '"list+john doe=domain.test"@x.example'),
    ("list@x.example", '"a\\"b"@domain.test', "+=", '"list+a\\"b=domain.test"@x.example'),
    ("list@x.example", "postmaster", "+=", "list+postmaster@x.example"),  # no domain: no second part
    ("list@x.example", "u@bücher.example", "+=", "list+u=xn--bcher-kva.example@x.example"),
    ("", "user@domain.test", "+=", ""),  # the null sender: no VERP
    (DOUBLE_BOUNCE_SENDER, "user@domain.test", "+=", DOUBLE_BOUNCE_SENDER),
])
def test_verp_sender(sender: str, recipient: str, delimiters: str, expected: str) -> None:
    assert verp_sender(sender, recipient, delimiters) == expected


def test_qmail_form_is_the_rule_with_dash_equals() -> None:
    assert qmail_form("prefix-@host.example-@[]") == ("prefix@host.example", "-=")
    sender, delimiters = qmail_form("prefix-@host.example-@[]")  # type: ignore[misc]
    assert verp_sender(sender, "user@domain.test", delimiters) == "prefix-user=domain.test@host.example"
    assert qmail_form("list+@host.example-@[]") == ("list@host.example", "+=")
    # an empty prefix survives as a quoted empty local part
    assert qmail_form("-@host.example-@[]") == ('""@host.example', "-=")
    assert verp_sender('""@host.example', "u@d.test", "-=") == "-u=d.test@host.example"
    for other in ("prefix@host.example", "prefix@host.example-@[]", "prefix-@-@[]", "-@[]", ""):
        assert qmail_form(other) is None, other


def test_delimiters_are_two_of_dash_plus_equals() -> None:
    assert all(valid_delimiters(d) for d in ("+=", "-=", "+-", "==", "--"))
    assert not any(valid_delimiters(d) for d in ("", "+", "+=-", "@=", "+%", "ab"))


# -- the envelope ---------------------------------------------------------------------------------
def _envelope(verp: str = "", sender: str = "list@x.example") -> Envelope:
    return Envelope("0660D62F5B1743082300F87000", sender,
                    (Recipient("ann@d38.test", "remote"), Recipient("bob@d38.test", "local")), 1.7e9, verp=verp)


def test_codec_keeps_verp_and_old_entries_read_as_none() -> None:
    with_verp = _envelope("-=")
    assert decode(encode(with_verp)) == with_verp
    assert decode(encode(with_verp)).sender_for(1) == "list-bob=d38.test@x.example"
    plain = encode(_envelope())
    assert b"verp" not in plain  # an entry without VERP is byte for byte what it was before the field
    old = json.dumps({"v": 1, "id": "0660D62F5B1743082300F87000", "sender": "list@x.example",
                      "rcpt": [["ann@d38.test", "remote"]], "birth": 1.7e9, "shard": 0, "size": 5}).encode()
    decoded = decode(old)  # written by a release without the field (and without smtputf8, client)
    assert decoded.verp == "" and decoded.sender_for(0) == "list@x.example"
    bad = json.loads(encode(with_verp))
    bad["verp"] = "@@"
    with pytest.raises(ValueError, match="VERP"):
        decode(json.dumps(bad).encode())


def test_bounces_one_per_failed_recipient_to_its_verp_address() -> None:
    assert bounces(_envelope(), [0, 1], "postmaster") == [("", "list@x.example", [0, 1])]
    assert bounces(_envelope("+="), [0, 1], "postmaster") == [("", "list+ann=d38.test@x.example", [0]),
                                                                ("", "list+bob=d38.test@x.example", [1])]
    assert bounces(_envelope("+=", DOUBLE_BOUNCE_SENDER), [0], "postmaster") is None
    assert bounces(_envelope("+=", ""), [0], "postmaster") == [(DOUBLE_BOUNCE_SENDER, "postmaster", [0])]


# -- the whole path -------------------------------------------------------------------------------
@pytest.fixture
def node(node_factory: Callable[..., Node], dns_server: DnsServer) -> Node:
    return node_factory(dnsresolvers=dns_server.hostport, dnstimeout="2", timeoutremote="10", reuseidle="1")


def start_pool(node: Node) -> None:
    log = node.var_dir.parent / "remote.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        node.procs.append(subprocess.Popen([sys.executable, "-m", "ops.cli", "worker", "remote"], env=node.env,
                                           stdout=out, stderr=subprocess.STDOUT))


def sendmail(node: Node, *args: str) -> None:
    result = node.command("sendmail", *args, input=MESSAGE)
    assert result.returncode == 0, result.stderr.decode()


def by_sender(sinks: list[Sink], marker: str) -> list[Transaction]:
    return sorted((t for s in sinks for t in s.transactions if marker in t.sender), key=lambda t: t.recipients)


def test_each_recipient_gets_its_own_transaction_with_its_verp_sender(
        node: Node, sink_factory: Callable[..., Sink]) -> None:
    sinks = [sink_factory("127.0.1.38"), sink_factory("127.0.1.39")]
    sendmail(node, "-V", "-f", "list1@x.example", *RECIPIENTS)  # the configured default, +=
    sendmail(node, "-f", "list2-@x.example-@[]", *RECIPIENTS)  # qmail's spelling: -=
    sendmail(node, "-f", "plain@x.example", *RECIPIENTS)  # no VERP
    node.start_smtpd()
    with smtplib.SMTP("127.0.0.1", node.port) as client:  # a relaynets client
        assert client.ehlo()[0] == 250 and client.has_extn("xverp")
        client.sendmail("list3@x.example", RECIPIENTS, MESSAGE, mail_options=["XVERP"])
        client.sendmail("list4@x.example", RECIPIENTS, MESSAGE, mail_options=["XVERP=+-"])
    start_pool(node)
    wait_until(lambda: sum(len(s.transactions) for s in sinks) >= 4 * 3 + 2, 20, "every transaction at the sinks")
    expected = {"list1": "list1+{u}={d}@x.example", "list2": "list2-{u}={d}@x.example",
                "list3": "list3+{u}={d}@x.example", "list4": "list4+{u}-{d}@x.example"}
    for marker, form in expected.items():
        seen = by_sender(sinks, marker)
        assert [t.recipients for t in seen] == [[r] for r in RECIPIENTS], marker  # one transaction each
        for t in seen:
            user, domain = t.recipients[0].split("@")
            assert t.sender == form.format(u=user, d=domain), marker
            assert t.data.endswith(b"hello subscribers\r\n")
    plain = by_sender(sinks, "plain")
    assert [t.recipients for t in plain] == [RECIPIENTS[:2], RECIPIENTS[2:]]  # one transaction per domain
    assert {t.sender for t in plain} == {"plain@x.example"}
    wait_until(lambda: node.spooled() == [], 10, "spool empty")


def test_a_permanent_failure_bounces_to_the_verp_address(node: Node, sink_factory: Callable[..., Sink]) -> None:
    refusing = sink_factory("127.0.1.38", rcpt_replies={"bob@d38.test": "550 5.1.1 no such user"})
    lists = sink_factory("127.0.1.39")  # the list's own domain: the bounce comes back here
    settings = node.settings()
    submitter = Submitter(settings, connect(settings))
    envelope = submitter.accept(Draft(submitter.new_id(), "owner@d39.test", ["ann@d38.test", "bob@d38.test"],
                                      MESSAGE, verp="-="))
    start_pool(node)
    spool = submitter.map.spool(envelope.shard)

    def states() -> list[Mark | None]:
        return spool.read(envelope.id).states()

    wait_until(lambda: all(m is not None for m in states()), 20, "both recipients attempted")
    assert [(m.state, m.status) for m in states() if m] == [("delivered", "2.0.0"), ("failed", "5.1.1")]
    assert [t.sender for t in refusing.transactions] == ["owner-ann=d38.test@d39.test"]
    assert Settler(settings, connect(settings), submitter).settle(envelope.shard, envelope.id, ["remote"]) \
        == "removed"
    (bounce,) = lists.wait_for(1)
    assert bounce.recipients == ["owner-bob=d38.test@d39.test"]  # the bounce's envelope recipient
    assert bounce.sender in ("", "<>")
    assert b"Final-Recipient: rfc822; bob@d38.test" in bounce.data and b"ann@d38.test" not in bounce.data


def test_xverp_is_refused_where_it_does_not_belong(node: Node) -> None:
    node.start_smtpd()
    with smtplib.SMTP("127.0.0.1", node.port, source_address=("127.0.0.2", 0)) as stranger:  # outside relaynets
        stranger.ehlo()
        assert not stranger.has_extn("xverp")
        code, text = stranger.mail("list@x.example", ["XVERP"])
        assert code == 555 and b"XVERP" in text
        assert stranger.mail("list@x.example")[0] == 250  # the same sender without it is fine
    with smtplib.SMTP("127.0.0.1", node.port) as client:
        client.ehlo()
        code, text = client.mail("list@x.example", ["XVERP=ab"])
        assert code == 501 and b"-+=" in text
        assert client.mail("", ["XVERP"])[0] == 503  # no VERP for the null sender
    result = node.command("sendmail", "-V", "-f", "", "ann@d38.test", input=MESSAGE)
    assert result.returncode == 64 and b"non-null sender" in result.stderr
    assert node.spooled() == []


def test_verp_crosses_qmqp_from_an_ingress_only_node(node_factory: Callable[..., Node]) -> None:
    """QMQP carries only a sender: the edge spells VERP qmail's way (``list+@x.example-@[]``) and
    the queue node's qmqpd reads it back into the envelope; delimiters without ``=`` cannot cross."""
    from core.qmqp import pack, send
    from tests.test_qmqpd import qmqp_node

    queue, port = qmqp_node(node_factory, node="q1")
    edge = node_factory(node="edge", role="ingress", qmqpservers=f"127.0.0.1:{port}")
    edge.start_smtpd()
    with smtplib.SMTP("127.0.0.1", edge.port) as client:  # in relaynets
        client.ehlo()
        assert client.has_extn("xverp")
        client.sendmail("list@x.example", ["ann@d38.test"], MESSAGE, mail_options=["XVERP"])
        code, text = client.mail("list@x.example", ["XVERP=+-"])
        assert code == 250
        client.rcpt("bob@d38.test")
        code, text = client.data(MESSAGE)
        assert code == 554 and b"cannot cross QMQP" in text, text
    assert edge.command("sendmail", "-XV-=", "-f", "news@x.example", "cat@d38.test", input=MESSAGE).returncode == 0
    reply = send("127.0.0.1", port, pack(MESSAGE, "raw-@x.example-@[]", ["dan@d38.test"]), 10)  # qmail-qmqpc's way
    assert reply.accepted, reply
    envelopes = {e.recipients[0].address: e for e in (queue.message(m)[0] for m in queue.spooled())}
    assert {r: (e.sender, e.verp) for r, e in envelopes.items()} == {
        "ann@d38.test": ("list@x.example", "+="), "cat@d38.test": ("news@x.example", "-="),
        "dan@d38.test": ("raw@x.example", "-=")}
    assert envelopes["ann@d38.test"].sender_for(0) == "list+ann=d38.test@x.example"


def test_local_delivery_uses_the_recipients_verp_sender(node_factory: Callable[..., Node], tmp_path: Path) -> None:
    rig = make_rig(node_factory, tmp_path, deliveryprograms="true", deliveryprogramuser="root")
    envelope = rig.submitter.accept(Draft(rig.submitter.new_id(), "list@x.example",
                                          ["alice@test.example", "fwd@test.example", "prog@test.example"],
                                          b"Subject: hi\r\n\r\nhello\r\n", verp="-="))
    rig.run(envelope)
    assert rig.marks(envelope) == []  # all three delivered: the entry is gone
    (copy,) = rig.inbox("alice")
    assert copy.startswith(b"Return-Path: <list-alice=test.example@x.example>\n")
    program = (tmp_path / "program.out").read_bytes()  # the program's input is the local copy too
    assert program.startswith(b"Return-Path: <list-prog=test.example@x.example>\n")
    ((forward, _),) = rig.queued_to("one@elsewhere.example")
    assert forward.sender == "list-fwd=test.example@x.example" and forward.verp == ""  # qmail-local's way


def test_an_authenticated_client_may_ask_for_verp(node_factory: Callable[..., Node], auth_slapd: Slapd) -> None:
    node, context = auth_node(node_factory, auth_slapd)  # relaynets 10.0.0.0/8: loopback is a stranger
    talk = Session(node.port, context)
    assert "XVERP" in talk.ehlo  # offered where AUTH is: the client may log in first
    assert talk.cmd("MAIL FROM:<auth-ssha@auth.example> XVERP").startswith("555 5.5.4")
    assert talk.plain("auth-ssha@auth.example", "pw-ssha-secret").startswith("235")
    assert talk.cmd("MAIL FROM:<auth-ssha@auth.example> XVERP=-=").startswith("250")
    assert talk.cmd("RCPT TO:<x@elsewhere.example>").startswith("250")
    assert talk.cmd("DATA").startswith("354")
    assert talk.cmd("Subject: list\r\n\r\nbody\r\n.").startswith("250")
    talk.close()
    wait_until(lambda: node.spooled(), timeout=10, what="the message spooled")
    envelope, _ = node.message(node.spooled()[0])
    assert envelope.verp == "-=" and envelope.sender_for(0) == "auth-ssha-x=elsewhere.example@auth.example"


def test_sendmail_verp_options_parse_as_postfix_spells_them() -> None:
    from ingress.inject import UsageError, parse_args

    assert parse_args(["x@y.example"]).verp is None
    for argv, verp in ((["-V"], ""), (["-XV"], ""), (["-V-="], "-="), (["-XV+-"], "+-"), (["-Vsome-envid"], None),
                       (["-X", "/tmp/log"], None)):
        opts = parse_args([*argv, "x@y.example"])
        assert (opts.verp, opts.recipients) == (verp, ["x@y.example"]), argv
    with pytest.raises(UsageError, match="-XV needs two characters"):
        parse_args(["-XVab", "x@y.example"])


@pytest.mark.parametrize(("sender", "delimiters", "spelled"), [
    ("list@x.example", "+=", "list+@x.example-@[]"), ("list@x.example", "-=", "list-@x.example-@[]"),
    ('"a b"@x.example', "-=", '"a b-"@x.example-@[]'), ("list@x.example", "+-", None)])
def test_qmails_spelling_is_the_inverse_of_its_reading(sender: str, delimiters: str, spelled: str | None) -> None:
    from core.verp import qmail_form, qmail_spelling

    assert qmail_spelling(sender, delimiters) == spelled
    if spelled is not None:
        assert qmail_form(spelled) == (sender, delimiters)
