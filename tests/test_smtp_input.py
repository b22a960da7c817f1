"""Bad input at the SMTP door, against a real shardmail SMTP process: the classic relay tricks
(refused for an outside client, accepted for one allowed to relay), NUL bytes, overlong lines and
commands with bounded memory, 8-bit addresses without SMTPUTF8, and header injection through the
EHLO name and addresses."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

import pytest

from tests.conftest import Conversation, Node
from tests.support import wait_until

TRICKS = [
    "user%elsewhere.example@test.example",  # percent hack
    "elsewhere.example!user@test.example",  # bang path
    '"user@elsewhere.example"@test.example',  # quoted @
    "user%elsewhere.example@hosted.example",
    "user@elsewhere.example",  # plain relay
    "user@[192.0.2.1]",  # address literal
    "user@elsewhere.example.",  # trailing dot
    "user@ELSEWHERE.Example",  # mixed case
    "user@test.example.elsewhere.example",  # our name as a prefix
    "@test.example:user@elsewhere.example",  # source route via ours
]


def outsider(node_factory: Callable[..., Node]) -> Node:
    node = node_factory(relaynets="10.0.0.0/8", tarpitcount="0")
    node.start_smtpd()
    return node


def rcpt(node: Node, address: str) -> str:
    talk = Conversation(node.port)
    try:
        talk.cmd("EHLO client.example")
        assert talk.cmd("MAIL FROM:<a@example.net>").startswith("250")
        return talk.cmd(f"RCPT TO:<{address}>")
    finally:
        talk.close()


@pytest.mark.parametrize("address", TRICKS)
def test_relay_tricks_refused_for_an_outside_client(node_factory: Callable[..., Node], address: str) -> None:
    reply = rcpt(outsider(node_factory), address)
    assert reply[:1] == "5" and not reply.startswith("250"), reply
    assert reply.split()[1].startswith(("5.7.1", "5.1.")), reply


def test_relay_tricks_accepted_for_a_relay_client(node_factory: Callable[..., Node]) -> None:
    node = node_factory()  # the client, 127.0.0.1, may relay by default
    node.start_smtpd()
    for address in TRICKS[:8]:
        assert rcpt(node, address).startswith("250"), address


def test_our_own_domains_still_take_mail_from_outside(node_factory: Callable[..., Node]) -> None:
    node = outsider(node_factory)
    assert rcpt(node, "user@test.example").startswith("250")
    assert rcpt(node, "user@TEST.Example").startswith("250")
    assert rcpt(node, "user@test.example.").startswith("250")  # a trailing dot names the same domain
    assert rcpt(node, "user@hosted.example").startswith("250")


def test_eight_bit_address_without_smtputf8(smtp: Callable[[], Conversation]) -> None:
    talk = smtp()
    talk.cmd("EHLO client.example")
    talk.send("MAIL FROM:<jörg@example.net>\r\n".encode())
    assert talk.reply().startswith("5")
    assert talk.cmd("MAIL FROM:<a@example.net>").startswith("250")
    talk.send("RCPT TO:<jörg@test.example>\r\n".encode())
    assert talk.reply().startswith("5")


def test_nul_bytes_in_commands(smtp: Callable[[], Conversation]) -> None:
    talk = smtp()
    talk.cmd("EHLO client.example")
    talk.send(b"MAIL FROM:<a\x00b@example.net>\r\n")
    assert talk.reply()[:1] == "5"
    talk.send(b"NO\x00OP\r\n")
    assert talk.reply()[:1] == "5"
    assert talk.cmd("NOOP").startswith("250")  # the session goes on


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_memory_stays_bounded_under_a_10_mb_line_without_newline(node_factory: Callable[..., Node]) -> None:
    node = node_factory()
    proc = node.start_smtpd()
    before = rss_kb(proc.pid)
    sock = socket.create_connection(("127.0.0.1", node.port), timeout=30)
    sock.recv(1000)
    chunk = b"A" * 65536
    sent = 0
    try:
        while sent < 10 * 1024 * 1024:
            sock.sendall(chunk)
            sent += len(chunk)
    except OSError:
        pass  # the server may hang up on us part-way: also bounded
    peak = rss_kb(proc.pid)
    sock.close()
    assert peak - before < 20 * 1024, f"RSS grew by {(peak - before) // 1024} MB"
    talk = Conversation(node.port)  # and the process still serves others
    assert talk.cmd("EHLO client.example").startswith("250")
    talk.close()


def test_overlong_command_line(smtp: Callable[[], Conversation]) -> None:
    talk = smtp()
    talk.cmd("EHLO client.example")
    assert talk.cmd("MAIL FROM:<" + "a" * 2000 + "@example.net>").startswith("500 5.5.2")
    assert talk.cmd("NOOP").startswith("250")


def test_overlong_data_in_dat_phase_is_bounded(node_factory: Callable[..., Node]) -> None:
    node = node_factory(databytes="100000")
    proc = node.start_smtpd()
    before = rss_kb(proc.pid)
    talk = Conversation(node.port, timeout=60)
    talk.cmd("EHLO client.example")
    talk.cmd("MAIL FROM:<a@example.net>")
    talk.cmd("RCPT TO:<user@test.example>")
    assert talk.cmd("DATA").startswith("354")
    for _ in range(160):  # 10 MB without a newline
        talk.send(b"B" * 65536)
    talk.send(b"\r\n.\r\n")
    assert talk.reply().startswith("552 5.3.4")
    assert rss_kb(proc.pid) - before < 20 * 1024
    talk.close()


def test_header_injection_through_ehlo_and_addresses(node_factory: Callable[..., Node]) -> None:
    node = node_factory()
    node.start_smtpd()
    talk = Conversation(node.port)
    talk.send(b"EHLO evil.example\rX-Injected: ehlo\r\n")
    assert talk.reply().startswith("250")
    assert talk.cmd("MAIL FROM:<a@example.net>").startswith("250")
    assert talk.cmd("RCPT TO:<user@test.example>").startswith("250")
    assert talk.cmd("DATA").startswith("354")
    reply = talk.cmd("Subject: hi\r\n\r\nbody\r\n.")
    assert reply.startswith("250"), reply
    talk.close()
    wait_until(lambda: node.spooled(), timeout=10, what="the message spooled")
    body = node.message(node.spooled()[0])[1]
    headers = body.split(b"\r\n\r\n", 1)[0]
    assert not any(line.startswith(b"X-Injected") for line in headers.split(b"\r\n"))
    assert b"\r" not in headers.replace(b"\r\n", b"")
    received = headers.split(b"\r\n")[0]
    assert received.startswith(b"Received: from evil.example?X-Injected:?ehlo ")


def test_slow_session_is_cut_at_the_idle_timeout(node_factory: Callable[..., Node]) -> None:
    node = node_factory(timeoutsmtpd="1")
    node.start_smtpd()
    talk = Conversation(node.port)
    started = time.monotonic()
    with pytest.raises(ConnectionError):
        talk.reply()  # silence: the server gives up
    assert time.monotonic() - started < 10


def _hop_data(talk: Conversation, hop_lines: int) -> str:
    assert talk.cmd("MAIL FROM:<a@example.net>").startswith("250")
    assert talk.cmd("RCPT TO:<postmaster@test.example>").startswith("250")
    assert talk.cmd("DATA").startswith("354")
    received = "".join(f"Received: from hop{i}.example by hop{i + 1}.example; Mon, 7 Dec 2026 00:00:00 +0000\r\n"
                       for i in range(hop_lines - 1))
    talk.send(f"{received}Delivered-To: someone@test.example\r\nSubject: loop\r\n\r\nround again\r\n.\r\n")
    return talk.reply()


def test_a_message_over_maxhops_is_refused_as_a_loop(node_factory: Callable[..., Node]) -> None:
    node = node_factory(maxhops="10")
    node.start_smtpd()
    talk = Conversation(node.port)
    try:
        talk.cmd("EHLO client.example")
        reply = _hop_data(talk, 10)  # ten of its own and ours make eleven
        assert reply.startswith("554 5.4.6"), reply
        assert talk.cmd("RSET").startswith("250")  # the session goes on
        assert _hop_data(talk, 9).startswith("250 2.0.0"), "nine and ours are within the limit"
    finally:
        talk.close()
