"""shardmail's QMQP client (core.qmqp.send) against a QMQP server no one here wrote: Postfix's qmqpd.

A private, loopback-only Postfix (bench.postfix_peer.postfix_instance, also the benchmark's peer)
runs qmqpd three times: open to 127.0.0.1, relaying every message to an aiosmtpd sink, so what
Postfix accepted can be read back as it left; closed to us (``qmqpd_authorized_clients`` names
another address); and closed with ``soft_bounce = yes``, Postfix's way of making a refusal temporary.
Postfix answers a refusal before it has read the request and hangs up on the rest: the client must
still report Postfix's own verdict, not the reset connection.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bench.postfix_peer import PostfixInstance, postfix_instance
from core.qmqp import pack, send
from tests.smtp_peers import Sink
from tests.support import free_port, wait_until

QMQPD = Path("/usr/lib/postfix/sbin/qmqpd")
SIZE_LIMIT = 100_000  # message_size_limit of the private Postfix
MESSAGE = b"From: a@example.net\nSubject: by QMQP to Postfix\n\nfirst line\n.second line, dot first\n"

pytestmark = pytest.mark.skipif(not QMQPD.is_file() or os.geteuid() != 0,
                                reason="needs Postfix's qmqpd (scripts/setup.sh installs postfix) and root")


@dataclass
class PostfixQmqp:
    instance: PostfixInstance
    sink: Sink
    open_port: int  # qmqpd for 127.0.0.1
    closed_port: int  # qmqpd for another client only
    soft_port: int  # the same, with soft_bounce = yes


@pytest.fixture(scope="module")
def postfix() -> Iterator[PostfixQmqp]:
    sink = Sink("127.0.0.1", free_port()).start()
    ports = [free_port() for _ in range(4)]
    smtp, open_port, closed_port, soft_port = ports
    relay = (f"message_size_limit = {SIZE_LIMIT}\n"  # relay everything to the sink, as a front end's smarthost
             f"default_transport = smtp\nrelay_transport = smtp\nrelayhost = [127.0.0.1]:{sink.port}\n")
    closed = (f"127.0.0.1:{closed_port} inet n - n - - qmqpd\n  -o qmqpd_authorized_clients=127.0.0.2\n"
              f"127.0.0.1:{soft_port} inet n - n - - qmqpd\n  -o qmqpd_authorized_clients=127.0.0.2\n"
              "  -o soft_bounce=yes\n")
    workdir = Path(tempfile.mkdtemp(prefix="shardmail-qmqp-interop-"))
    workdir.chmod(0o755)  # Postfix's daemons, as user postfix, must reach their queue under it
    try:
        with postfix_instance(workdir / "postfix", smtp, extra_main_cf=relay, qmqp_port=open_port,
                              extra_master_cf=closed) as instance:
            yield PostfixQmqp(instance, sink, open_port, closed_port, soft_port)
    finally:
        sink.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def nothing_kept(postfix: PostfixQmqp, relayed_before: int) -> bool:
    """Postfix kept nothing of a refused message: its queue is empty and the sink got nothing new
    (a message it had taken would be in one or the other once its reply is in)."""
    wait_until(lambda: postfix.instance.queued() == 0, 20, "Postfix's queue empty")
    return len(postfix.sink.transactions) == relayed_before


def test_a_message_for_two_recipients_is_queued_by_postfix_and_leaves_it_intact(postfix: PostfixQmqp) -> None:
    reply = send("127.0.0.1", postfix.open_port, pack(MESSAGE, "a@example.net", ["x@example.org", "y@example.com"]),
                 10)
    assert reply.code == "K" and reply.text.startswith("Ok: queued as "), reply
    queue_id = reply.text.removeprefix("Ok: queued as ")
    (relayed,) = postfix.sink.wait_for(1)  # both recipients go to the one relayhost in one transaction
    assert relayed.sender == "a@example.net"
    assert sorted(relayed.recipients) == ["x@example.org", "y@example.com"]
    headers, _, body = relayed.data.partition(b"\r\n\r\n")
    assert b"with QMQP" in headers and queue_id.encode() in headers  # Postfix's own Received line
    assert b"\r\nSubject: by QMQP to Postfix" in headers
    assert body == b"first line\r\n.second line, dot first\r\n"  # LF became CRLF, the dot survived
    wait_until(lambda: postfix.instance.queued() == 0, 20, "Postfix's queue empty after the relay")


def test_a_message_over_message_size_limit_is_refused_for_good(postfix: PostfixQmqp) -> None:
    big = MESSAGE + (b"x" * 76 + b"\n") * (SIZE_LIMIT // 77 + 10)
    before = len(postfix.sink.transactions)
    began = time.monotonic()
    reply = send("127.0.0.1", postfix.open_port, pack(big, "a@example.net", ["x@example.org"]), 10)
    assert reply.code == "D" and "exceeds storage limit" in reply.text, reply  # not Z for the reset
    assert time.monotonic() - began < 9  # answered (after qmqpd_error_delay), not timed out
    assert nothing_kept(postfix, before)


def test_a_client_postfix_does_not_authorize_is_refused_for_good(postfix: PostfixQmqp) -> None:
    before = len(postfix.sink.transactions)
    reply = send("127.0.0.1", postfix.closed_port, pack(MESSAGE, "a@example.net", ["x@example.org"]), 10)
    assert reply.code == "D" and "not authorized" in reply.text, reply
    assert nothing_kept(postfix, before)


def test_with_soft_bounce_postfix_refuses_for_now_and_the_client_says_z(postfix: PostfixQmqp) -> None:
    before = len(postfix.sink.transactions)
    reply = send("127.0.0.1", postfix.soft_port, pack(MESSAGE, "a@example.net", ["x@example.org"]), 10)
    assert reply.code == "Z" and "not authorized" in reply.text, reply
    assert nothing_kept(postfix, before)
