"""SIGKILL of a real remote delivery process after the peer accepted a message ("." answered 250)
and before the spool mark: after a new attempt every message is delivered, and the one whose mark
was lost at most twice (the spool's crash-state table: state 6, one duplicate per crash window)."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from collections.abc import Callable

import pytest

from core.redis_conn import connect
from core.submit import Draft, Submitter
from tests.conftest import Node
from tests.dns_server import DnsServer
from tests.smtp_peers import Sink
from tests.support import wait_until


@pytest.mark.crash
def test_killed_between_the_peers_250_and_the_mark(node_factory: Callable[..., Node], dns_server: DnsServer,
                                                    sink_factory: Callable[..., Sink]) -> None:
    sink = sink_factory("127.0.1.30")
    node = node_factory(dnsresolvers=dns_server.hostport, concurrencydestination="1")
    settings = node.settings()
    submitter = Submitter(settings, connect(settings))
    for i in range(5):
        submitter.accept(Draft(submitter.new_id(), "a@example.net", [f"u{i}@d30.test"],
                               f"Subject: {i}\r\n\r\nbody {i}\r\n".encode()))
    argv = [sys.executable, "-m", "ops.cli", "worker", "remote", "--name", "remote-0"]  # a supervisor's slot name
    crashed = subprocess.run(argv, env=dict(node.env, SHARDMAIL_CRASH_AT="before_remote_mark"), capture_output=True,
                             timeout=60)
    assert crashed.returncode == -9
    assert len(sink.transactions) == 1  # one session at a time: exactly one message was in the window
    assert len(node.spooled()) == 5  # nothing was marked, nothing removed
    # restarted under its name, the pool takes back the jobs its killed predecessor had claimed
    worker = subprocess.Popen(argv, env=node.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: node.spooled() == [], timeout=30)
    finally:
        worker.terminate()
        worker.wait(15)
    copies = Counter(r for t in sink.transactions for r in t.recipients)
    assert set(copies) == {f"u{i}@d30.test" for i in range(5)}  # nothing lost
    assert sorted(copies.values()) == [1, 1, 1, 1, 2]  # one duplicate: the message whose mark the kill took
