"""TLS on the listeners and the limits on sessions, against real shardmail SMTP processes: STARTTLS
(and the state it forgets), implicit TLS and submission listeners, connection caps per address and
in all, the error cap, tarpitting and the session lifetime. Real TLS handshakes with a certificate
made by ``shardmail gencert``."""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Callable

import pytest

from tests.conftest import Conversation, Node
from tests.support import free_port


def make_cert(node: Node) -> ssl.SSLContext:
    made = node.command("gencert", "--host", "mx.test.example")
    assert made.returncode == 0, made.stderr
    cert, key = node.var_dir / "tls" / "cert.pem", node.var_dir / "tls" / "key.pem"
    assert cert.exists() and key.stat().st_mode & 0o077 == 0  # the key is the owner's alone
    return ssl.create_default_context(cafile=str(cert))


class TlsConversation(Conversation):
    """Conversation over a socket that STARTTLS (or an implicit-TLS port) has wrapped."""

    def starttls(self, context: ssl.SSLContext, hostname: str = "mx.test.example") -> None:
        self.sock = context.wrap_socket(self.sock, server_hostname=hostname)
        self.buffer = b""


def tls_node(node_factory: Callable[..., Node], **overrides: str) -> tuple[Node, ssl.SSLContext]:
    node = node_factory(**overrides)
    context = make_cert(node)
    node.start_smtpd()
    return node, context


def test_starttls_forgets_the_session_and_is_not_offered_again(node_factory: Callable[..., Node]) -> None:
    node, context = tls_node(node_factory)
    talk = TlsConversation(node.port)
    assert "STARTTLS" in talk.cmd("EHLO client.example")
    assert talk.cmd("MAIL FROM:<a@example.net>").startswith("250")
    assert talk.cmd("STARTTLS").startswith("220")
    talk.starttls(context)
    # RFC 3207 4.2: everything before is forgotten - no HELO, no transaction
    assert talk.cmd("RCPT TO:<user@test.example>").startswith("503")
    assert talk.cmd("MAIL FROM:<a@example.net>").startswith("503")
    ehlo = talk.cmd("EHLO client.example")
    assert ehlo.startswith("250") and "STARTTLS" not in ehlo
    assert talk.cmd("STARTTLS").startswith("5")  # not again
    talk.close()


@pytest.mark.parametrize("injected", ["MAIL FROM:<injected@example.net>", "EHLO injected.example",
                                      "RSET\r\nMAIL FROM:<injected@example.net>\r\nRCPT TO:<user@test.example>"])
def test_no_plaintext_command_sent_with_starttls_survives_it(node_factory: Callable[..., Node], injected: str) -> None:
    """Commands pipelined after STARTTLS in the same plaintext packet (the CVE-2011-0411 kind of
    injection) are never run inside the TLS session: the first reply over TLS answers the first
    command sent over TLS, and the state is the fresh one of RFC 3207 4.2."""
    node, context = tls_node(node_factory)
    talk = TlsConversation(node.port)
    assert "STARTTLS" in talk.cmd("EHLO client.example")
    talk.send(f"STARTTLS\r\n{injected}\r\n")
    assert talk.reply().startswith("220")
    assert talk.buffer == b""  # and no plaintext answer to what followed
    try:
        talk.starttls(context)
        first = talk.cmd("EHLO client.example")
    except (ssl.SSLError, ConnectionError, OSError):
        return  # the server threw the connection away: nothing injected ran either
    assert first.startswith("250-mx.test.example") and "injected" not in first, first
    assert talk.cmd("MAIL FROM:<a@example.net>").startswith("250 2.1.0")  # no transaction was open
    assert talk.cmd("RCPT TO:<user@test.example>").startswith("250 2.1.5")
    assert talk.cmd("RSET").startswith("250")
    talk.close()


def test_without_a_certificate_no_starttls_is_offered(smtp: Callable[[], Conversation]) -> None:
    talk = smtp()
    assert "STARTTLS" not in talk.cmd("EHLO client.example")
    assert talk.cmd("STARTTLS").startswith("454 4.7.0")


def test_smtps_and_submission_listeners(node_factory: Callable[..., Node]) -> None:
    smtps, submission = free_port(), free_port()
    _, context = tls_node(node_factory, smtps_listen=f"127.0.0.1:{smtps}",
                             submission_listen=f"127.0.0.1:{submission}")
    raw = socket.create_connection(("127.0.0.1", smtps), timeout=10)
    wrapped = context.wrap_socket(raw, server_hostname="mx.test.example")
    talk = TlsConversation.__new__(TlsConversation)
    talk.sock, talk.buffer = wrapped, b""
    assert talk.reply().startswith("220")
    ehlo = talk.cmd("EHLO client.example")
    assert "STARTTLS" not in ehlo and "AUTH" in ehlo  # TLS from the first byte: AUTH offered at once
    assert talk.cmd("MAIL FROM:<a@example.net>").startswith("530 5.7.0")  # submission: AUTH first
    talk.close()
    plain = Conversation(submission)
    ehlo = plain.cmd("EHLO client.example")
    assert "STARTTLS" in ehlo and "AUTH" not in ehlo  # AUTH only over TLS
    assert plain.cmd("AUTH PLAIN AGFiYwBkZWY=").startswith("538 5.7.11")
    assert plain.cmd("MAIL FROM:<a@example.net>").startswith("530 5.7.0")
    plain.close()


def test_submission_needs_a_certificate(node_factory: Callable[..., Node]) -> None:
    node = node_factory(submission_listen=f"127.0.0.1:{free_port()}")
    result = node.command("smtpd")
    assert result.returncode == 78 and b"certificate" in result.stdout + result.stderr


def connect_from(source: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(20)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def first_line(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data.split(b"\r\n", 1)[0]


def test_500_connections_from_one_address_are_capped_while_another_gets_through(
        node_factory: Callable[..., Node]) -> None:
    node = node_factory(relaynets="10.0.0.0/8", concurrencyperip="20", concurrencyincoming="1000")
    node.start_smtpd()
    socks = [connect_from("127.0.0.5", node.port) for _ in range(500)]
    try:
        greetings = [first_line(s) for s in socks]
        admitted = [g for g in greetings if g.startswith(b"220")]
        refused = [g for g in greetings if g.startswith(b"421 4.7.0")]
        assert len(admitted) == 20 and len(refused) == 480
        other = connect_from("127.0.0.6", node.port)
        assert first_line(other).startswith(b"220")  # another client still gets through
        other.close()
    finally:
        for sock in socks:
            sock.close()
    again = connect_from("127.0.0.5", node.port)  # the slots come back as connections close
    deadline = time.monotonic() + 10
    line = first_line(again)
    while not line.startswith(b"220") and time.monotonic() < deadline:
        again.close()
        again = connect_from("127.0.0.5", node.port)
        line = first_line(again)
    assert line.startswith(b"220")
    again.close()


def test_total_connection_cap(node_factory: Callable[..., Node]) -> None:
    node = node_factory(concurrencyincoming="3")
    node.start_smtpd()
    admitted: list[socket.socket] = []
    deadline = time.monotonic() + 10
    while len(admitted) < 3:  # (start_smtpd's probe may still hold a slot for a moment)
        assert time.monotonic() < deadline, "three connections never admitted"
        sock = connect_from(f"127.0.0.{10 + len(admitted)}", node.port)
        if first_line(sock).startswith(b"220"):
            admitted.append(sock)
        else:
            sock.close()
    try:
        for i in range(2):
            extra = connect_from(f"127.0.0.{20 + i}", node.port)
            assert first_line(extra).startswith(b"421 4.7.0")
            extra.close()
    finally:
        for sock in admitted:
            sock.close()


def test_too_many_errors_close_the_session(node_factory: Callable[..., Node]) -> None:
    node = node_factory(maxerrors="3")
    node.start_smtpd()
    talk = Conversation(node.port)
    assert talk.cmd("EHLO client.example").startswith("250")
    assert talk.cmd("BOGUS").startswith("500")
    assert talk.cmd("MAIL FROM:<bad address>").startswith("5")
    last = talk.cmd("ALSO BOGUS")
    assert last.startswith("500") or last.startswith("421")
    if last.startswith("500"):
        assert talk.reply().startswith("421 4.7.0")
    with pytest.raises(ConnectionError):
        talk.cmd("NOOP")


def test_tarpit_slows_refused_recipients_after_the_count(node_factory: Callable[..., Node]) -> None:
    node = node_factory(tarpitcount="2", tarpitdelay="1", maxerrors="100", relaynets="10.0.0.0/8")
    node.start_smtpd()
    talk = Conversation(node.port)
    talk.cmd("EHLO client.example")
    talk.cmd("MAIL FROM:<a@example.net>")
    times = []
    for i in range(4):
        started = time.monotonic()
        assert talk.cmd(f"RCPT TO:<nobody{i}@elsewhere.example>").startswith("554 5.7.1")
        times.append(time.monotonic() - started)
    assert max(times[:2]) < 0.5  # the first refusals are answered at once
    assert min(times[2:]) >= 1.0  # then each waits tarpitdelay
    assert talk.cmd("RCPT TO:<user@test.example>").startswith("250")  # good ones are never delayed


def test_session_lifetime(node_factory: Callable[..., Node]) -> None:
    node = node_factory(timeoutconnection="2")
    node.start_smtpd()
    talk = Conversation(node.port)
    assert talk.cmd("EHLO client.example").startswith("250")
    deadline = time.monotonic() + 10
    with pytest.raises(ConnectionError):
        while time.monotonic() < deadline:
            reply = talk.cmd("NOOP")  # a busy session is still cut at its lifetime
            if reply.startswith("421"):
                assert "4.4.2" in reply
                talk.cmd("NOOP")
    assert time.monotonic() < deadline


def test_a_slow_but_steady_data_transfer_is_not_cut(node_factory: Callable[..., Node]) -> None:
    """timeoutsmtpd bounds silence, not the time a long DATA takes."""
    node = node_factory(timeoutsmtpd="1")
    node.start_smtpd()
    talk = Conversation(node.port)
    talk.cmd("EHLO client.example")
    talk.cmd("MAIL FROM:<a@example.net>")
    talk.cmd("RCPT TO:<user@test.example>")
    assert talk.cmd("DATA").startswith("354")
    talk.send(b"Subject: slow\r\n\r\n")
    started = time.monotonic()
    while time.monotonic() - started < 2.5:  # longer than the timeout in all, never silent for long
        talk.send(b"a line of the body\r\n")
        time.sleep(0.2)  # the client's pace, not a wait for the server
    assert talk.cmd(".").startswith("250")
