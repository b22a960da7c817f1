"""An ingress-only node (``role = "ingress"``): no spool of its own, each SMTP message handed to a
queue node over QMQP and 250 said only after that node's K. It spreads mail over the queue nodes,
fails over when one dies (451 only when none takes the message), passes a queue node's D on as
554, finds queue nodes by their heartbeats when ``qmqpservers`` is empty, and its sendmail does
the same."""

from __future__ import annotations

import re
import signal
import smtplib
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import Node
from tests.support import free_port, wait_until
from tests.test_qmqpd import listens, qmqp_node
from tests.test_recovery import start


def ingress_node(node_factory: Callable[..., Node], servers: list[int], **overrides: str) -> Node:
    node = node_factory(node="edge", role="ingress", qmqpservers=",".join(f"127.0.0.1:{p}" for p in servers),
                        qmqptimeout="10", **overrides)
    node.start_smtpd()
    return node


def send(node: Node, i: int, recipients: list[str] | None = None) -> tuple[int, str]:
    with smtplib.SMTP("127.0.0.1", node.port, timeout=30) as client:
        client.ehlo("client.example")
        client.mail("a@example.net")
        for rcpt in recipients or [f"u{i}@test.example"]:
            client.rcpt(rcpt)
        code, text = client.data(f"Subject: msg {i}\r\n\r\nbody {i}\r\n".encode())
    return code, text.decode()


def numbers(node: Node) -> set[int]:
    """The message numbers in a queue node's spool."""
    found = set()
    for message_id in node.spooled():
        _, body = node.message(message_id)
        match = re.search(rb"^Subject: msg (\d+)", body, re.M)
        assert match is not None and b"with QMQP" in body and b"with ESMTP" in body
        found.add(int(match.group(1)))
    return found


def test_mail_is_spread_over_the_queue_nodes_and_a_dead_one_is_skipped(node_factory: Callable[..., Node]) -> None:
    (q1, p1), (q2, p2) = qmqp_node(node_factory, node="q1"), qmqp_node(node_factory, node="q2")
    edge = ingress_node(node_factory, [p1, p2])
    for i in range(10):
        assert send(edge, i)[0] == 250
    assert numbers(q1) | numbers(q2) == set(range(10)) and numbers(q1) and numbers(q2)  # both took a share
    assert not (edge.var_dir / "spool").exists()  # the edge keeps nothing
    q1.procs[0].send_signal(signal.SIGKILL)
    q1.procs[0].wait(10)
    for i in range(10, 20):
        assert send(edge, i)[0] == 250  # q1's turns go to q2
    assert set(range(10, 20)) <= numbers(q2)
    q2.procs[0].send_signal(signal.SIGKILL)
    q2.procs[0].wait(10)
    code, text = send(edge, 99)
    assert code == 451 and "no queue node took the message" in text, text
    assert 99 not in numbers(q1) | numbers(q2)


def test_a_queue_nodes_refusal_is_554_with_its_reason(node_factory: Callable[..., Node]) -> None:
    q, port = qmqp_node(node_factory, node="q1", databytes="300")
    edge = ingress_node(node_factory, [port], databytes="1000000")
    with smtplib.SMTP("127.0.0.1", edge.port, timeout=30) as client:
        client.ehlo("client.example")
        client.mail("a@example.net")
        client.rcpt("u@test.example")
        # 300 KB: the queue node refuses it from its length field, before the edge has sent it all
        code, text = client.data(b"Subject: big\r\n\r\n" + (b"x" * 60 + b"\r\n") * 5000)
    assert code == 554 and text.startswith(b"5.3.4") and b"message too big" in text, text
    assert q.spooled() == []


def test_queue_nodes_are_found_by_their_heartbeats(node_factory: Callable[..., Node]) -> None:
    q, _ = qmqp_node(node_factory, node="q1")
    start(q, "scheduler")  # its heartbeat announces the QMQP listener
    edge = node_factory(node="edge", role="ingress")
    edge.start_smtpd()

    def taken() -> bool:
        return send(edge, 1)[0] == 250

    wait_until(taken, timeout=20, interval=0.3, what="the edge finding q1 by its heartbeat")
    assert 1 in numbers(q)


@pytest.mark.parametrize("reachable", [True, False])
def test_sendmail_on_an_ingress_node_hands_over_too(node_factory: Callable[..., Node], reachable: bool) -> None:
    q, port = qmqp_node(node_factory, node="q1")
    target = port if reachable else free_port()
    edge = node_factory(node="edge", role="ingress", qmqpservers=f"127.0.0.1:{target}", qmqptimeout="5")
    result = subprocess.run([sys.executable, "-m", "ops.cli", "sendmail", "-f", "a@example.net", "u@test.example"],
                            input=b"Subject: msg 7\n\nby sendmail\n", env=edge.env, capture_output=True, timeout=60)
    if reachable:
        assert result.returncode == 0, result.stderr
        (message_id,) = q.spooled()
        envelope, body = q.message(message_id)
        assert [r.address for r in envelope.recipients] == ["u@test.example"] and b"by sendmail" in body
    else:
        assert result.returncode == 75 and b"try again later" in result.stderr, result.stderr
        assert q.spooled() == []
    assert listens(port)


def test_a_queue_node_killed_mid_stream_loses_nothing(node_factory: Callable[..., Node]) -> None:
    """SIGKILL of one queue node while eight clients send: the edge fails over to the other, every
    message gets 250, and each is in a queue node's spool; only a K lost in the kill can leave a
    second copy (at most one per message in flight then)."""
    (q1, p1), (q2, p2) = qmqp_node(node_factory, node="q1"), qmqp_node(node_factory, node="q2")
    edge = ingress_node(node_factory, [p1, p2])
    lock = threading.Lock()
    accepted: list[int] = []

    def one(i: int) -> int:
        code = send(edge, i)[0]
        with lock:
            if code == 250:
                accepted.append(i)
            if len(accepted) == 60 and q1.procs[0].poll() is None:
                q1.procs[0].send_signal(signal.SIGKILL)
        return code

    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(one, range(200)))
    assert q1.procs[0].wait(10) == -signal.SIGKILL
    assert codes == [250] * 200
    first, second = numbers(q1), numbers(q2)
    assert first | second == set(range(200))
    assert len(first) >= 20 and len(first & second) <= 8  # q1 took its turns until the kill
