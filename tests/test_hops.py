"""The hop limit (``maxhops``): core.hops's count (pure, property-tested), and local delivery
refusing a looping message 5.4.6 on every path (Maildir, forward, cluster hand-over) with the
scheduler bouncing it; real spool, Redis and Maildirs, users from the LDIF directory."""

from __future__ import annotations

import email
import email.policy
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core import hops
from core.jobs import Claim
from core.outcome import Failed
from core.submit import Draft
from scheduler.retry import Settler
from tests.conftest import Node
from tests.test_local import Rig, make_rig

LIMIT = 5


def test_counts_received_and_delivered_to_in_the_header_block_only() -> None:
    message = (b"Received: from a by b; Mon, 7 Dec 2026 09:00:00 +0000\r\n"
               b"\tfor <x@y>\r\n"  # a continuation line is part of its field, never a hop of its own
               b"RECEIVED : from c\r\n"  # field names in any case, blanks before the colon (RFC 5322 obs)
               b"delivered-to: x@y\r\n"
               b"X-Received: no\r\n"
               b"Received-SPF: pass\r\n"
               b"Subject: Received: not a field name here\r\n"
               b"\r\n"
               b"Received: in the body\r\nDelivered-To: in the body\r\n")
    assert hops.count(message) == 3
    assert hops.count(message.replace(b"\r\n", b"\n")) == 3  # a local copy's LF lines
    assert hops.count(b"\r\nReceived: x\r\n") == 0  # no header block at all
    assert hops.count(b"Received: x\r\nReceived: y") == 2  # no body, no final line end
    assert hops.count(b"") == 0


def test_check_refuses_only_beyond_the_limit_counting_added_lines() -> None:
    three = b"Received: a\r\nReceived: b\r\nDelivered-To: c\r\n\r\nbody\r\n"
    assert hops.check(three, 3) is None
    loop = hops.check(three, 2)
    assert isinstance(loop, Failed) and loop.status == "5.4.6" and "3 Received/Delivered-To" in loop.text
    assert hops.check(three, 3, added=1) == Failed(
        "5.4.6", "Too many hops (4 Received/Delivered-To lines, limit 3): routing loop")


names = st.sampled_from(["Received", "received", "DELIVERED-TO", "Delivered-To", "Subject", "X-Received",
                         "Received-SPF", "Delivered-Top", "To"])
values = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=30)


@given(st.lists(st.tuples(names, values, st.booleans()), max_size=40),
       st.lists(st.tuples(names, values), max_size=10), st.sampled_from([b"\r\n", b"\n"]))
def test_count_matches_the_fields_of_the_header_block(fields: list[tuple[str, str, bool]],
                                                      body: list[tuple[str, str]], end: bytes) -> None:
    lines = []
    for name, value, folded in fields:
        lines.append(f"{name}: {value}".encode())
        if folded:
            lines.append(b"\tReceived: a folded line " + value.encode())
    message = end.join(lines) + end + end + end.join(f"{n}: {v}".encode() for n, v in body)
    expected = sum(name.lower() in ("received", "delivered-to") for name, _, _ in fields)
    assert hops.count(message) == expected


def looping(hop_lines: int) -> bytes:
    received = b"".join(b"Received: from relay%d.example by relay%d.example\r\n" % (i, i + 1)
                        for i in range(hop_lines))
    return received + b"Subject: round and round\r\n\r\nhello\r\n"


@pytest.fixture
def rig(node_factory: Callable[..., Node], tmp_path: Path) -> Rig:
    return make_rig(node_factory, tmp_path, maxhops=str(LIMIT))


def test_a_local_delivery_counts_the_delivered_to_it_adds(rig: Rig) -> None:
    under = rig.send(["alice@test.example"], body=looping(LIMIT - 1))  # + our Delivered-To = LIMIT: delivered
    assert rig.marks(under) == [] and len(rig.inbox("alice")) == 1
    over = rig.send(["alice@test.example"], body=looping(LIMIT))
    assert rig.marks(over) == [("failed", "5.4.6")] and len(rig.inbox("alice")) == 1
    # Delivered-To lines of earlier hops (other addresses) count as much as Received lines
    mixed = rig.send(["alice@test.example"], body=b"Delivered-To: list@test.example\r\n" + looping(LIMIT - 1))
    assert rig.marks(mixed) == [("failed", "5.4.6")] and len(rig.inbox("alice")) == 1


def test_the_failure_is_bounced_to_the_sender(rig: Rig) -> None:
    over = rig.send(["alice@test.example", "bob@test.example"], body=looping(LIMIT), sender="loop@example.net")
    assert rig.marks(over) == [("failed", "5.4.6"), ("failed", "5.4.6")]
    settler = Settler(rig.settings, rig.conn, rig.submitter)
    assert settler.settle(over.shard, over.id, ["local"]) == "removed"
    ((bounce_envelope, raw),) = rig.queued_to("loop@example.net")
    assert bounce_envelope.sender == ""
    bounce = email.message_from_bytes(raw, policy=email.policy.default)
    status = next(p for p in bounce.walk() if p.get_content_type() == "message/delivery-status")
    assert [r["Status"] for r in status.get_payload()[1:]] == ["5.4.6", "5.4.6"]


def test_forwards_and_cluster_hand_overs_of_a_looping_message_fail(rig: Rig) -> None:
    ok = rig.send(["fwd@test.example"], body=looping(LIMIT - 1))
    assert rig.marks(ok) == []
    ((_forwarded, body),) = rig.queued_to("one@elsewhere.example")
    assert hops.count(body) == LIMIT  # the forward carries its Delivered-To: the next hop sees the limit
    assert hops.check(body, LIMIT) is None and hops.check(body, LIMIT, added=1) is not None
    over = rig.send(["fwd@test.example"], body=looping(LIMIT))
    assert rig.marks(over) == [("failed", "5.4.6")] and len(rig.queued_to("one@elsewhere.example")) == 1
    # the cluster peer (smtproutes: 127.0.0.1:1, nobody there) is not even tried: 5.4.6, not 4.4.1
    cluster = rig.send(["remote@test.example"], body=looping(LIMIT))
    assert rig.marks(cluster) == [("failed", "5.4.6")]
    tried = rig.send(["remote@test.example"], body=looping(1))
    assert rig.marks(tried) == [("deferred", "4.4.1")]


def test_a_claimed_batch_refuses_looping_messages_too(node_factory: Callable[..., Node], tmp_path: Path) -> None:
    rig = make_rig(node_factory, tmp_path, maxhops=str(LIMIT), ldapcachettl="60", ldapnegcachettl="60")
    rig.send(["alice@test.example"])  # the cache knows alice: the batch below stages her copies
    envelopes = [rig.submitter.accept(Draft(rig.submitter.new_id(), "a@example.net", ["alice@test.example"], body))
                 for body in (looping(LIMIT), looping(1))]
    assert rig.jobs.delivery.plain(envelopes[0])
    rig.jobs([Claim(f"{e.id}-local", e.id, e.shard, "local", "x") for e in envelopes])
    assert rig.marks(envelopes[0]) == [("failed", "5.4.6")] and rig.marks(envelopes[1]) == []
    assert len(rig.inbox("alice")) == 2
