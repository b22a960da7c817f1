"""``shardmail run`` on embedded defaults: its own redis-server, SMTP, supervision, clean stop."""

from __future__ import annotations

import json
import os
import re
import signal
import smtplib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.config import default_node
from tests.conftest import free_port, wait_until

NODE = default_node()  # no node configured: the host name's first label


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


class RunningNode:
    """``shardmail run`` in ``workdir`` (its output in run.log): embedded defaults, plus ``env``."""

    def __init__(self, workdir: Path, **env: str) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.log = workdir / "run.log"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("SHARDMAIL_", "PROMETHEUS_"))}
        self.env.update({"SHARDMAIL_SMTP_LISTEN": f"127.0.0.1:{self.port}", "SHARDMAIL_INGRESS_PROCESSES": "2"})
        self.env.update(env)
        with open(self.log, "wb") as out:
            # no config file and no redis_url: everything on embedded defaults, under ./var
            self.proc = subprocess.Popen([sys.executable, "-m", "ops.cli", "run"], cwd=workdir, env=self.env,
                                         stdout=out, stderr=subprocess.STDOUT)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def pids(self, name: str) -> list[int]:
        return [int(p) for p in re.findall(rf"started {name}(?:-\d+)? \(pid (\d+)\)", self.text())]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # the supervisor stops its children itself
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def status(self, *options: str) -> str:
        result = subprocess.run([sys.executable, "-m", "ops.cli", "status", *options], cwd=self.workdir, env=self.env,
                                capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        return result.stdout


@pytest.fixture
def running(tmp_path: Path) -> Iterator[RunningNode]:
    node = RunningNode(tmp_path)
    wait_until(lambda: "shardmail is running" in node.text() or node.proc.poll() is not None, timeout=30)
    assert node.proc.poll() is None, node.text()
    yield node
    node.stop()
    for pid in [p for name in ("redis", "smtpd", "local", "remote", "scheduler") for p in node.pids(name)]:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def send(port: int) -> None:
    def attempt() -> bool:
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                client.sendmail("a@example.net", ["postmaster@localhost"], b"Subject: hi\r\n\r\nhello\r\n")
            return True
        except (OSError, smtplib.SMTPException):
            return False

    wait_until(attempt, timeout=20, interval=0.1)


def test_run_on_embedded_defaults_delivers_to_the_postmaster(running: RunningNode) -> None:
    assert (running.workdir / "var" / "redis" / "redis.sock").exists()
    assert "mail: postmaster@localhost" in (running.workdir / "var" / "users.ldif").read_text()
    send(running.port)
    inbox = running.workdir / "var" / "mail" / "postmaster" / "new"
    wait_until(lambda: inbox.exists() and len(list(inbox.iterdir())) == 1)
    message = next(inbox.iterdir()).read_bytes()
    assert message.startswith(b"Return-Path: <a@example.net>\nDelivered-To: postmaster@localhost\nReceived: ")
    assert b"\r\n" not in message
    lines = running.status().splitlines()
    assert lines[0].split()[:4] == ["shard", "state", "channel", "ready"]
    wait_until(lambda: sum(s["spooled"] for s in json.loads(running.status("--json"))["shards"]) == 0)


def test_run_restarts_a_killed_child(running: RunningNode) -> None:
    wait_until(lambda: len(running.pids("smtpd")) == 2)
    first = running.pids("smtpd")[0]
    os.kill(first, signal.SIGKILL)
    wait_until(lambda: "died: killed by signal 9" in running.text())
    wait_until(lambda: len(running.pids("smtpd")) == 3, timeout=15)
    send(running.port)


def test_run_stops_everything_on_sigterm(running: RunningNode) -> None:
    wait_until(lambda: len(running.pids("smtpd")) == 2 and len(running.pids("local")) == 1
               and len(running.pids("remote")) == 1)
    children = running.pids("redis") + running.pids("smtpd") + running.pids("local") + running.pids("remote")
    running.proc.send_signal(signal.SIGTERM)
    assert running.proc.wait(30) == 0
    for pid in children:
        wait_until(lambda pid=pid: not alive(pid), timeout=10)


def test_rq_sees_the_delivery_pools_as_workers(running: RunningNode) -> None:
    import redis
    from rq import Worker

    conn = redis.Redis(unix_socket_path=str(running.workdir / "var" / "redis" / "redis.sock"))
    wait_until(lambda: len(Worker.all(connection=conn)) == 2, timeout=20)
    workers = {w.queue_names()[0].rpartition(".")[2]: w for w in Worker.all(connection=conn)}
    assert workers["local"].queue_names() == [f"shardmail.{NODE}.s{i}.local" for i in range(4)]
    assert workers["local"].pid == running.pids("local")[0]
    assert workers["remote"].queue_names() == [f"shardmail.{NODE}.s{i}.remote" for i in range(4)]
    assert workers["remote"].pid == running.pids("remote")[0]
    info = subprocess.run([sys.executable, "-m", "rq.cli", "info", "--url",
                           f"unix://{running.workdir}/var/redis/redis.sock"], capture_output=True, text=True,
                          timeout=30)
    assert "2 workers" in info.stdout
    assert f"shardmail.{NODE}.s0.local" in info.stdout and f"shardmail.{NODE}.s3.remote" in info.stdout
