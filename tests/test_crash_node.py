"""SIGKILL at the worst moments while 2,000 messages flow through a whole supervised node (SMTP in,
local Maildirs, remote SMTP, bounces): after the crash and the supervisor's restart, every message
the node accepted is delivered or bounced, local copies are never doubled, and a remote delivery or
a bounce is doubled at most once, only for what the kill caught between the peer's reply and its
mark (the spool's crash-state table: state 6)."""

from __future__ import annotations

import email
import email.policy
import re
import signal
import smtplib
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import Node
from tests.dns_server import DnsServer
from tests.smtp_peers import Sink
from tests.support import wait_until

MESSAGES = 2000
SENDER = "sender@test.example"  # bounces come back to a local Maildir, where they can be counted
IN_FLIGHT = 20  # concurrencydestination: remote sessions to the sink at once


def recipients(i: int) -> list[str]:
    """Four kinds of message, in turn: local, remote, both, and a remote failure (bounced) plus a local."""
    return [[f"l{i}@test.example"], [f"r{i}@d43.test"], [f"l{i}@test.example", f"r{i}@d43.test"],
            [f"bad{i}@d43.test", f"l{i}@test.example"]][i % 4]


def send(port: int, i: int) -> bool:
    """True when the node said 250 to the message. A refused connection (the SMTP process is being
    restarted) is tried again, as a client would; a transaction cut off is not (it may have been
    committed, and a second copy would be the client's duplicate, not the node's)."""
    body = f"From: <{SENDER}>\r\nSubject: msg {i}\r\n\r\nmessage number {i}\r\n"
    deadline = time.monotonic() + 20
    while True:
        try:
            client = smtplib.SMTP("127.0.0.1", port, timeout=20)
            break
        except (ConnectionError, smtplib.SMTPServerDisconnected):  # before the greeting: nothing was sent yet
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)  # a client's pause before it connects again
    try:
        with client:
            client.sendmail(SENDER, recipients(i), body)
        return True
    except (OSError, smtplib.SMTPException):
        return False


def maildir(root: Path) -> tuple[Counter[str], Counter[int]]:
    """Local copies per recipient, and bounces per original message number."""
    copies: Counter[str] = Counter()
    bounces: Counter[int] = Counter()
    for path in (root / "new").iterdir() if (root / "new").exists() else []:
        data = path.read_bytes()
        to = re.search(rb"^Delivered-To: (\S+)", data, re.M)
        assert to is not None
        if to.group(1).decode() == SENDER:
            message = email.message_from_bytes(data.replace(b"\n", b"\r\n"), policy=email.policy.default)
            original = next(p for p in message.walk() if p.get_content_type() == "message/rfc822")
            number = re.search(r"msg (\d+)", str(original.get_payload()[0]["Subject"]))
            assert number is not None
            bounces[int(number.group(1))] += 1
        else:
            copies[to.group(1).decode()] += 1
    return copies, bounces


@pytest.mark.crash
@pytest.mark.parametrize("checkpoint", ["after_commit", "after_maildir_link", "before_local_mark",
                                        "before_remote_mark", "after_bounce_queued"])
def test_nothing_lost_and_duplicates_bounded(node_factory: Callable[..., Node], dns_server: DnsServer,
                                             sink_factory: Callable[..., Sink], tmp_path: Path,
                                             checkpoint: str) -> None:
    sink = sink_factory("127.0.1.43", rcpt_replies={f"bad{i}@d43.test": "550 5.1.1 no such user"
                                                    for i in range(3, MESSAGES, 4)})
    node = node_factory(dnsresolvers=dns_server.hostport, ingress_processes="1", sweepinterval="3",
                        concurrencydestination=str(IN_FLIGHT),
                        crash_at=checkpoint, crash_once=str(tmp_path / "crashed"))
    log = tmp_path / "run.log"
    with open(log, "wb") as out:  # SHARDMAIL_CRASH_AT and _ONCE reach every process of the node
        supervisor = subprocess.Popen([sys.executable, "-m", "ops.cli", "run"], env=node.env, stdout=out,
                                      stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: "shardmail is running" in log.read_text(errors="replace"), 30, "node up")
        with ThreadPoolExecutor(10) as pool:
            accepted = [i for i, ok in enumerate(pool.map(lambda i: send(node.port, i), range(MESSAGES))) if ok]
        assert (tmp_path / "crashed").exists(), "the checkpoint was never reached"
        assert len(accepted) >= MESSAGES - 20  # only what was in flight at the crash went unanswered
        wait_until(lambda: node.spooled() == [], timeout=180, interval=0.5, what="every message settled")
    finally:
        supervisor.send_signal(signal.SIGTERM)
        supervisor.wait(60)
    assert "died: killed by signal 9" in log.read_text(errors="replace")
    copies, bounces = maildir(node.var_dir / "mail" / "catchall")
    remote = Counter(r for t in sink.transactions for r in t.recipients)
    for i in accepted:  # nothing the node accepted is lost
        for address in recipients(i):
            if address.startswith("bad"):
                assert bounces[i] >= 1, (i, "no bounce")
            elif address.endswith("@test.example"):
                assert copies[address] == 1, (i, address, copies[address])
            else:
                assert remote[address] >= 1, (i, address, "not delivered")
    assert max(copies.values()) == 1  # a local copy is never doubled, whatever was killed
    # a remote copy is doubled only when the kill cut off the peer's reply to it: at most once per
    # message, and at most as many as were in flight (concurrencydestination sessions)
    assert max(remote.values()) <= 2
    assert sum(remote.values()) - len(remote) <= (1 if checkpoint != "before_remote_mark" else IN_FLIGHT)
    assert sum(bounces.values()) - len(bounces) <= 1
    assert all(t.sender == SENDER for t in sink.transactions)
