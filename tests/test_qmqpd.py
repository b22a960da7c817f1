"""``shardmail qmqpd``: a QMQP request is answered K only once durably queued, and delivered like
SMTP mail; clients outside qmqpclients are cut off before a byte is read; every malformed request
gets D or a closed connection within the timeout, and nothing partial reaches the spool. Interop:
nullmailer's own QMQP client (its Debian package's ``qmqp`` module) hands mail in."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from core.jobs import Jobs
from core.qmqp import Reply, netstring, pack, send
from core.redis_conn import connect
from core.shards import Namespace, ShardMap
from tests.conftest import Node, RedisServer
from tests.conftest import _connectable as listens
from tests.support import free_port, wait_until
from tests.test_recovery import start

NULLMAILER_QMQP = Path(__file__).resolve().parent.parent / ".venv/nullmailer/usr/lib/nullmailer/qmqp"
MESSAGE = b"From: a@example.net\nSubject: by QMQP\n\nfirst line\nsecond line\n"


def qmqp_node(node_factory: Callable[..., Node], **overrides: str) -> tuple[Node, int]:
    port = free_port()
    options = {"qmqp_listen": f"127.0.0.1:{port}", "qmqpclients": "127.0.0.0/8", "timeoutsmtpd": "3"}
    node = node_factory(**{**options, **overrides})
    proc = start(node, "qmqpd")
    wait_until(lambda: proc.poll() is not None or listens(port), timeout=20, what="qmqpd listening")
    assert proc.poll() is None
    return node, port


@pytest.fixture
def qmqpd(node_factory: Callable[..., Node]) -> tuple[Node, int]:
    return qmqp_node(node_factory, databytes="2000", maxrcptcount="3")


def raw(port: int, data: bytes, close_write: bool = True, timeout: float = 10) -> bytes:
    """What the server says to ``data`` before it closes (b"": closed without a word)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        if close_write:
            sock.shutdown(socket.SHUT_WR)
        chunks = []
        try:
            while chunk := sock.recv(4096):
                chunks.append(chunk)
        except ConnectionResetError:
            pass
        return b"".join(chunks)


def test_a_request_is_queued_with_crlf_and_a_received_line_then_delivered(qmqpd: tuple[Node, int]) -> None:
    node, port = qmqpd
    reply = send("127.0.0.1", port, pack(MESSAGE, "a@example.net", ["u1@test.example", "r@hosted.example"]), 10)
    assert reply.accepted, reply
    message_id = reply.text.removeprefix("ok ")
    envelope, body = node.message(message_id)  # on disk by the time K was said
    assert envelope.sender == "a@example.net"
    assert [r.address for r in envelope.recipients] == ["u1@test.example", "r@hosted.example"]
    assert body.startswith(b"Received: from [127.0.0.1]\r\n\tby mx.test.example (shardmail) with QMQP id ")
    assert body.endswith(b"\r\n\r\nfirst line\r\nsecond line\r\n") and b"\n\n" not in body.replace(b"\r\n", b"")
    start(node, "worker", "local")
    inbox = node.var_dir / "mail" / "catchall" / "new"
    wait_until(lambda: inbox.exists() and os.listdir(inbox), timeout=20, what="local delivery")
    delivered = (inbox / os.listdir(inbox)[0]).read_bytes()
    assert b"Subject: by QMQP" in delivered and b"with QMQP" in delivered


def test_a_request_arriving_a_few_bytes_at_a_time_is_taken_whole(qmqpd: tuple[Node, int]) -> None:
    """The server gathers the request as it comes: the length field split over reads, then the rest."""
    node, port = qmqpd
    request = pack(MESSAGE, "a@example.net", ["u1@test.example"])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for at in range(0, 12, 2):
            sock.sendall(request[at:at + 2])
            time.sleep(0.02)  # pacing the input (the point of the test), not waiting for the server
        sock.sendall(request[12:])  # no EOF from us: the request's own length says where it ends
        received = b""
        while chunk := sock.recv(4096):
            received += chunk
        reply = Reply.decode(received)
    assert reply.accepted, reply
    _, body = node.message(reply.text.removeprefix("ok "))
    assert body.endswith(b"\r\n\r\nfirst line\r\nsecond line\r\n")


def test_the_null_sender_and_8bit_addresses_are_taken(qmqpd: tuple[Node, int]) -> None:
    node, port = qmqpd
    reply = send("127.0.0.1", port, pack(MESSAGE, "", ["jörg@test.example"]), 10)
    assert reply.accepted, reply
    envelope, _ = node.message(reply.text.removeprefix("ok "))
    assert envelope.sender == "" and envelope.smtputf8


@pytest.mark.parametrize(("request_bytes", "why"), [
    (b"x:abc,", "malformed netstring length"),
    (b"12345678901:", "malformed netstring length"),  # a length field no message has
    (b"05:abcde,", "malformed netstring length"),  # leading zero
    (netstring(b"abc"), "malformed netstring length"),  # the inside is not netstrings
    (netstring(netstring(MESSAGE) + netstring(b"a@example.net")), "at least one recipient"),
    (b"%d:%s;" % (len(netstring(MESSAGE)), netstring(MESSAGE)), "without its comma"),
    (pack(MESSAGE, "a@example.net", ["not an address"]), "#5.1.3"),
    (pack(MESSAGE, "a@example.net", ["a@test.example", "b@test.example", "c@test.example", "d@test.example"]),
     "too many recipients"),
    (pack(b"x" * 2001, "a@example.net", ["a@test.example"]), "message too big"),
    (b"99999999:", "message too big"),  # refused from the length field, nothing else read
    (pack(b"Received: x\n" * 101 + b"\nloop\n", "a@example.net", ["a@test.example"]), "5.4.6"),
])
def test_a_malformed_or_refused_request_gets_d_and_leaves_nothing(qmqpd: tuple[Node, int], request_bytes: bytes,
                                                                  why: str) -> None:
    node, port = qmqpd
    reply = Reply.decode(raw(port, request_bytes))
    assert reply.permanent and why in reply.text, reply
    assert node.spooled() == []


@pytest.mark.parametrize("partial", [b"", b"120:", pack(MESSAGE, "a@example.net", ["a@test.example"])[:-1]])
def test_eof_mid_request_closes_without_a_reply_and_nothing_is_spooled(qmqpd: tuple[Node, int],
                                                                        partial: bytes) -> None:
    node, port = qmqpd
    assert raw(port, partial) == b""
    assert node.spooled() == []


def test_a_silent_client_is_cut_off_after_the_timeout(qmqpd: tuple[Node, int]) -> None:
    node, port = qmqpd
    began = time.monotonic()
    assert raw(port, b"50:" + b"x" * 10, close_write=False) == b""  # timeoutsmtpd = 3
    assert 2.5 < time.monotonic() - began < 8
    assert node.spooled() == []


def test_a_client_outside_qmqpclients_is_cut_off_before_reading(node_factory: Callable[..., Node]) -> None:
    node, port = qmqp_node(node_factory, qmqpclients="10.0.0.0/8")
    began = time.monotonic()
    assert raw(port, pack(MESSAGE, "a@example.net", ["a@test.example"]), close_write=False) == b""
    assert time.monotonic() - began < 2  # not the timeout: at once
    assert node.spooled() == []
    refused = send("127.0.0.1", port, pack(MESSAGE, "a@example.net", ["a@test.example"]), 5)
    assert refused.code == "Z"  # to a client, a server that says nothing is a temporary failure


def test_redis_down_is_z_and_nothing_stays(node_factory: Callable[..., Node], own_redis: RedisServer) -> None:
    node, port = qmqp_node(node_factory, redis_url=own_redis.url)
    own_redis.stop()
    reply = send("127.0.0.1", port, pack(MESSAGE, "a@example.net", ["a@test.example"]), 15)
    assert reply.code == "Z" and "#4." in reply.text, reply
    assert node.spooled() == []


def test_no_qmqp_listen_is_a_configuration_error(node_factory: Callable[..., Node]) -> None:
    result = node_factory().command("qmqpd")
    assert result.returncode == 78 and b"qmqp_listen is empty" in result.stderr


def test_nullmailer_hands_mail_in(qmqpd: tuple[Node, int], tmp_path: Path) -> None:
    """nullmailer's queue format: the sender, the recipients, a blank line, the message (on fd 3)."""
    node, port = qmqpd
    assert NULLMAILER_QMQP.exists(), "scripts/setup.sh test unpacks nullmailer's qmqp client"
    mail = tmp_path / "mail"
    mail.write_bytes(b"n@example.net\nu7@test.example\nu8@test.example\n\n" + MESSAGE)
    result = subprocess.run(["sh", "-c", f'exec "$0" --host=127.0.0.1 --port={port} 3<"$1"', str(NULLMAILER_QMQP),
                             str(mail)], input=b"", capture_output=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    assert b"Succeeded: ok " in result.stdout + result.stderr
    (message_id,) = node.spooled()
    envelope, body = node.message(message_id)
    assert envelope.sender == "n@example.net"
    assert [r.address for r in envelope.recipients] == ["u7@test.example", "u8@test.example"]
    assert b"with QMQP" in body and body.endswith(b"second line\r\n")


def test_a_move_line_on_top_keeps_birth_and_hold_and_nowhere_else_counts(qmqpd: tuple[Node, int]) -> None:
    """ops.move's first line: taken off, the birth kept, hold=yes committed into hold/ with no job;
    the same line lower down (a sender's header) is only a header."""
    node, port = qmqpd
    line = b"X-Shardmail-Move: node=n0 id=0123456789ABCDEF0123456789 birth=1700000000.5 hold=yes\n"
    reply = send("127.0.0.1", port, pack(line + MESSAGE, "a@example.net", ["h@test.example"]), 10)
    assert reply.accepted, reply
    held_id = reply.text.removeprefix("ok ")
    settings = node.settings()
    shard_map = ShardMap(settings)
    (shard,) = [s for s in shard_map.ids() if shard_map.spool(s).where(held_id) == "hold"]
    envelope, body = shard_map.spool(shard).load(held_id, held=True)
    assert envelope.birth == 1700000000.5 and b"X-Shardmail-Move" not in body
    assert body.startswith(b"Received: ") and b"\r\n\r\nfirst line\r\n" in body
    assert Jobs(connect(settings), Namespace.of(settings)).doorbells(shard) == set()  # no job for held mail
    lower = b"Subject: x\n" + line
    reply = send("127.0.0.1", port, pack(lower + b"\nbody\n", "a@example.net", ["q@test.example"]), 10)
    assert reply.accepted, reply
    envelope, body = node.message(reply.text.removeprefix("ok "))  # queued, not held
    assert envelope.birth > 1700000001 and b"X-Shardmail-Move: node=n0" in body
