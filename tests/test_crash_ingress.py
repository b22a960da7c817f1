"""SIGKILL of a real SMTP ingress process at named checkpoints (SHARDMAIL_CRASH_AT).

After each crash: a message the client saw accepted is in the spool, intact, and queued or
recoverable; a message never committed is absent from the queue (at most a tmp/ leftover that
the sweep recognises); nothing half-written is ever taken for a message.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest

from core.jobs import Jobs, message_of
from core.redis_conn import connect
from core.shards import Namespace, ShardMap
from tests.conftest import Conversation, Node, wait_until

BODY = "Subject: crash test\r\n\r\n" + "line of body text\r\n" * 200


def send_until_crash(node: Node) -> str | None:
    """One transaction; returns the queued id, or None if the connection died before the reply."""
    c = Conversation(node.port)
    try:
        c.cmd("EHLO client.example")
        c.cmd("MAIL FROM:<a@example.net>")
        c.cmd("RCPT TO:<x@test.example>")
        c.cmd("DATA")
        c.send(BODY + ".\r\n")
        try:
            reply = c.reply()
        except (ConnectionError, TimeoutError, OSError):
            return None
        match = re.search(r"queued as ([0-9A-F]{26})", reply)
        return match.group(1) if match else None
    finally:
        c.close()


def spool_state(node: Node) -> tuple[list[str], list[str]]:
    shard_map = ShardMap(node.settings())
    committed = [i for s in shard_map.ids() for i in shard_map.spool(s).ids()]
    leftovers = [lo.path.name for s in shard_map.ids() for lo in shard_map.spool(s).leftovers()]
    return committed, leftovers


def crashed(node: Node, checkpoint: str) -> None:
    proc = node.start_smtpd(SHARDMAIL_CRASH_AT=checkpoint)
    node.answer = send_until_crash(node)  # type: ignore[attr-defined]
    wait_until(lambda: proc.poll() is not None)
    assert proc.returncode == -9, f"expected SIGKILL at {checkpoint}, got {proc.returncode}"


def jobs_of(node: Node, message_id: str) -> list[str]:
    settings = node.settings()
    jobs = Jobs(connect(settings), Namespace.of(settings))
    return [j for s in range(settings.shards) for j in jobs.queue(s, "local").get_job_ids()
            if message_of(j) == message_id]


@pytest.mark.crash
def test_killed_after_data_write_leaves_only_a_leftover(node_factory: Callable[..., Node]) -> None:
    node = node_factory()
    crashed(node, "after_data_write")
    committed, leftovers = spool_state(node)
    assert node.answer is None  # type: ignore[attr-defined]
    assert committed == []
    assert len(leftovers) == 1
    shard_map = ShardMap(node.settings())
    assert [lo.committed for s in shard_map.ids() for lo in shard_map.spool(s).leftovers()] == [False]


@pytest.mark.crash
def test_killed_after_commit_before_enqueue_keeps_the_message_intact(node_factory: Callable[..., Node]) -> None:
    node = node_factory()
    crashed(node, "after_commit")
    committed, leftovers = spool_state(node)
    assert node.answer is None  # type: ignore[attr-defined]  # the client never saw 250: it will retry
    assert len(committed) == 1 and leftovers == []
    shard_map = ShardMap(node.settings())
    envelope = next(e.envelope for s in shard_map.ids() for e in shard_map.spool(s).scan())
    assert envelope is not None and envelope.pending() == [0]
    body = shard_map.spool(envelope.shard).body(envelope.id)
    assert body.endswith(BODY.encode())
    assert jobs_of(node, envelope.id) == []  # no doorbell yet: the sweep rings it (crash-state 4)


@pytest.mark.crash
def test_killed_after_250_keeps_message_and_job(node_factory: Callable[..., Node]) -> None:
    node = node_factory()
    crashed(node, "after_250")
    message_id = node.answer  # type: ignore[attr-defined]
    assert message_id is not None
    committed, leftovers = spool_state(node)
    assert committed == [message_id] and leftovers == []
    assert jobs_of(node, message_id) == [f"n1-{message_id}-local"]
