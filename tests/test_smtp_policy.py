"""Policy at the SMTP door, against real shardmail SMTP processes: the default relaynets, badmailfrom,
badrcptto, relaymailfrom, DNSBL reject and tag modes (a real unbound serving the blocklist zone; the client
connects from 127.0.0.2, the RFC 5782 test address), and message rate limits per client address
shared by two ingress processes through Redis."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator

import pytest

from tests.conftest import Conversation, Node
from tests.dns_server import DnsServer
from tests.support import wait_until
from tests.test_dnsbl import dnsbl_zone


@pytest.fixture(scope="module")
def blocklists(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DnsServer]:
    with DnsServer(tmp_path_factory.mktemp("smtp-dnsbl"), [dnsbl_zone()]) as server:
        yield server


class From(Conversation):
    """A conversation from a chosen loopback source address."""

    def __init__(self, port: int, source: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
        self.buffer = b""
        self.greeting = self.reply()


def transaction(talk: Conversation, sender: str, recipient: str) -> tuple[str, str]:
    talk.cmd("RSET")
    return talk.cmd(f"MAIL FROM:<{sender}>"), talk.cmd(f"RCPT TO:<{recipient}>")


def test_badmailfrom_and_badrcptto(node_factory: Callable[..., Node]) -> None:
    node = node_factory(badmailfrom="spam@bad.example,@worse.example", badrcptto="closed@test.example")
    node.start_smtpd()
    talk = Conversation(node.port)
    talk.cmd("EHLO client.example")
    mail, rcpt = transaction(talk, "spam@bad.example", "user@test.example")
    assert mail.startswith("250") and rcpt.startswith("553 5.7.1")  # refused at RCPT, as qmail does
    assert transaction(talk, "anyone@WORSE.example", "user@test.example")[1].startswith("553 5.7.1")
    assert transaction(talk, "other@bad.example", "user@test.example")[1].startswith("250")
    assert transaction(talk, "a@example.net", "closed@test.example")[1].startswith("553 5.7.1")
    assert transaction(talk, "a@example.net", "open@test.example")[1].startswith("250")
    assert transaction(talk, "", "user@test.example")[1].startswith("250")  # <> is not "bad" by default
    talk.close()


def test_only_127_0_0_1_relays_by_default(node_factory: Callable[..., Node]) -> None:
    """relaynets defaults to 127.0.0.1/32 and ::1/128: another loopback address stands for another host."""
    node = node_factory()
    node.start_smtpd()
    for source, relays in (("127.0.0.1", True), ("127.0.0.2", False), ("127.255.255.254", False)):
        talk = From(node.port, source)
        talk.cmd("EHLO client.example")
        mail, rcpt = transaction(talk, "a@example.net", "x@elsewhere.example")
        assert mail.startswith("250"), (source, mail)
        if relays:
            assert rcpt.startswith("250 2.1.5"), (source, rcpt)
        else:
            assert rcpt == "554 5.7.1 Relaying denied", (source, rcpt)
            assert transaction(talk, "a@example.net", "x@test.example")[1].startswith("250")  # locals still
        talk.close()


def test_relaymailfrom_lets_a_listed_sender_relay(node_factory: Callable[..., Node]) -> None:
    node = node_factory(relaynets="10.0.0.0/8", relaymailfrom="boss@partner.example")
    node.start_smtpd()
    talk = Conversation(node.port)
    talk.cmd("EHLO client.example")
    assert transaction(talk, "boss@partner.example", "x@elsewhere.example")[1].startswith("250")
    assert transaction(talk, "other@partner.example", "x@elsewhere.example")[1].startswith("554 5.7.1")
    assert transaction(talk, "", "x@elsewhere.example")[1].startswith("554 5.7.1")
    talk.close()


def dnsbl_node(node_factory: Callable[..., Node], server: DnsServer, lists: str) -> Node:
    node = node_factory(relaynets="10.0.0.0/8", rbllist=lists, rbltimeout="2", dnsresolvers=server.hostport)
    node.start_smtpd()
    return node


def test_dnsbl_reject(node_factory: Callable[..., Node], blocklists: DnsServer) -> None:
    node = dnsbl_node(node_factory, blocklists, "block.dnsbl.test:reject")
    listed = From(node.port, "127.0.0.2")
    listed.cmd("EHLO client.example")
    reply = transaction(listed, "a@example.net", "user@test.example")[1]
    assert reply.startswith("554 5.7.1") and "Test entry" in reply
    listed.close()
    clean = From(node.port, "127.0.0.1")  # not listed: NXDOMAIN
    clean.cmd("EHLO client.example")
    assert transaction(clean, "a@example.net", "user@test.example")[1].startswith("250")
    clean.close()


def test_dnsbl_tag_adds_a_header(node_factory: Callable[..., Node], blocklists: DnsServer) -> None:
    node = dnsbl_node(node_factory, blocklists, "tag.dnsbl.test:tag")
    listed = From(node.port, "127.0.0.2")
    listed.cmd("EHLO client.example")
    assert transaction(listed, "a@example.net", "user@test.example")[1].startswith("250")
    assert listed.cmd("DATA").startswith("354")
    assert listed.cmd("Subject: tagged\r\n\r\nbody\r\n.").startswith("250")
    listed.close()
    wait_until(lambda: node.spooled(), timeout=10, what="the message spooled")
    headers = node.message(node.spooled()[0])[1].split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    assert b"X-RBL-Check: tag.dnsbl.test Tagged: suspicious" in headers


def test_dnsbl_outage_does_not_block_mail(node_factory: Callable[..., Node], blocklists: DnsServer) -> None:
    node = dnsbl_node(node_factory, blocklists, "slow.dnsbl.test:reject")
    listed = From(node.port, "127.0.0.2")
    listed.cmd("EHLO client.example")
    assert transaction(listed, "a@example.net", "user@test.example")[1].startswith("250")
    listed.close()


def test_rate_limit_per_address_holds_for_the_cluster(node_factory: Callable[..., Node]) -> None:
    first = node_factory(ratelimitip="3", ratelimitwindow="3600", node="alpha")
    second = node_factory(ratelimitip="3", ratelimitwindow="3600", node="beta")  # same Redis and prefix
    first.start_smtpd()
    second.start_smtpd()
    replies = []
    for node in (first, second, first, second, first):
        talk = Conversation(node.port)
        talk.cmd("EHLO client.example")
        replies.append(talk.cmd("MAIL FROM:<a@example.net>"))
        talk.close()
    assert [r[:3] for r in replies] == ["250", "250", "250", "451", "451"]
    assert replies[3].startswith("451 4.7.1")
    other = From(first.port, "127.0.0.3")  # another address has its own count
    other.cmd("EHLO client.example")
    assert other.cmd("MAIL FROM:<a@example.net>").startswith("250")
    other.close()
