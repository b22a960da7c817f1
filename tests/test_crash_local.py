"""SIGKILL of a real local delivery process between the Maildir link and the spool mark: after a
new attempt there is exactly one copy in the Maildir."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from core.redis_conn import connect
from core.submit import Draft, Submitter
from tests.conftest import Node, wait_until


@pytest.mark.crash
@pytest.mark.parametrize("checkpoint", ["after_maildir_link", "before_local_mark"])
def test_killed_mid_delivery_then_retried_leaves_exactly_one_copy(
    node_factory: Callable[..., Node], tmp_path: Path, checkpoint: str
) -> None:
    node = node_factory(ldapmessagestore=str(tmp_path / "mail"))
    settings = node.settings()
    submitter = Submitter(settings, connect(settings))
    envelopes = [submitter.accept(Draft(submitter.new_id(), "a@example.net", [f"user{i}@test.example"],
                                        f"Subject: {i}\r\n\r\nbody {i}\r\n".encode())) for i in range(5)]
    inbox = tmp_path / "mail" / "catchall" / "new"
    argv = [sys.executable, "-m", "ops.cli", "worker", "local", "--name", "local-0"]  # a supervisor's slot name
    crashed = subprocess.run(argv, env=dict(node.env, SHARDMAIL_CRASH_AT=checkpoint), capture_output=True, timeout=60)
    assert crashed.returncode == -9
    assert 1 <= len(list(inbox.iterdir())) <= 5
    assert len(node.spooled()) >= 1  # at least the message being marked is still queued
    # restarted under its name, the pool takes back the jobs its killed predecessor had claimed
    worker = subprocess.Popen(argv, env=node.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: node.spooled() == [], timeout=30)
    finally:
        worker.terminate()
        worker.wait(15)
    names = sorted(p.name for p in inbox.iterdir())
    assert len(names) == 5, names
    assert sorted({n.split(".")[1] for n in names}) == sorted(f"Q{e.id}R0" for e in envelopes)
