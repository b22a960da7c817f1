"""rq's own tools on shardmail's Redis: the real ``rq info`` CLI and rq-dashboard's JSON API list the
shard queues holding mail queued over SMTP, with readable job descriptions (as the README shows)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import Conversation, Node
from tests.support import die_with_parent, free_port, wait_until

BIN = Path(sys.executable).parent
QUEUES = {f"shardmail.n1.s{s}.{c}" for s in (0, 1) for c in ("local", "remote")}


def queue_two(node: Node) -> list[str]:
    """Two messages over SMTP, each to a local and a remote recipient: with two shards and round
    robin, one job in each of the four queues (no pool runs). Returns the queue ids."""
    node.start_smtpd()
    ids = []
    c = Conversation(node.port)
    c.cmd("EHLO client.example")
    for _ in range(2):
        assert c.cmd("MAIL FROM:<a@example.net>").startswith("250")
        assert c.cmd("RCPT TO:<alice@test.example>").startswith("250")
        assert c.cmd("RCPT TO:<bob@remote.example>").startswith("250")
        assert c.cmd("DATA").startswith("354")
        reply = c.cmd("Subject: rq\r\n\r\nhi\r\n.")
        assert reply.startswith("250"), reply
        ids.append(reply.rsplit(" ", 1)[1])
    c.close()
    return ids


def test_rq_info_lists_the_shard_queues(smtpd: Node) -> None:
    queue_two(smtpd)
    url = smtpd.env["SHARDMAIL_REDIS_URL"]
    result = subprocess.run([str(BIN / "rq"), "info", "--url", url], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for name in QUEUES:
        assert re.search(rf"^{re.escape(name)} \|\S* 1, 0 executing", result.stdout, re.M), result.stdout
    assert "4 queues, 4 jobs total" in result.stdout
    only = subprocess.run([str(BIN / "rq"), "info", "--url", url, "shardmail.n1.s0.local"], capture_output=True,
                          text=True, timeout=60)
    assert "shardmail.n1.s0.local" in only.stdout and "shardmail.n1.s1.remote" not in only.stdout


def get_json(url: str) -> dict[str, object] | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return json.loads(answer.read())  # type: ignore[no-any-return]
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


def test_rq_dashboard_shows_the_queues_and_job_descriptions(smtpd: Node) -> None:
    if not (BIN / "rq-dashboard").exists():
        pytest.fail("rq-dashboard is not installed: pip install -e '.[test]'")
    ids = queue_two(smtpd)
    port = free_port()
    dashboard = subprocess.Popen(
        [str(BIN / "rq-dashboard"), "--bind", "127.0.0.1", "--port", str(port), "--json",
         "--redis-url", smtpd.env["SHARDMAIL_REDIS_URL"]],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=die_with_parent)
    base = f"http://127.0.0.1:{port}/0/data"
    try:
        found = wait_until(lambda: dashboard.poll() is not None or get_json(f"{base}/queues.json"), timeout=30,
                           what="rq-dashboard answering")
        assert dashboard.poll() is None, dashboard.stderr.read().decode() if dashboard.stderr else "exited"
        queues = {q["name"]: q for q in found["queues"]}  # type: ignore[index]
        assert set(queues) == QUEUES
        assert all(q["count"] == 1 and q["failed_job_registry_count"] == 0 for q in queues.values())
        descriptions = set()
        for name in sorted(QUEUES):
            listing = get_json(f"{base}/jobs/{name}/queued/8/asc/1.json")
            assert listing is not None, name
            (job,) = listing["jobs"]  # type: ignore[misc]
            channel = name.rsplit(".", 1)[1]
            match = re.fullmatch(rf"deliver (\S+) \(1 rcpt\) via {channel}", job["description"])
            assert match and job["id"] == f"n1-{match.group(1)}-{channel}", job
            descriptions.add(match.group(1))
            detail = get_json(f"{base}/job/{job['id']}.json")
            assert detail is not None and detail["origin"] == name and detail["status"] == "queued"
        assert descriptions == set(ids)
    finally:
        dashboard.terminate()
        dashboard.wait(10)
