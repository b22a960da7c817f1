"""A real Redis deployment under Sentinel on loopback: one primary, one replica, three
``redis-sentinel`` processes (quorum 2), tuned to fail over within a few seconds.

Fixture: ``sentinel_deployment`` (a started ``Deployment``; ``kill_primary()`` SIGKILLs the primary
and waits until the sentinels name the promoted replica). Every wait is a poll with a deadline.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from tests.support import free_port, wait_until

SERVER_BIN = shutil.which("redis-server")
SENTINEL_BIN = shutil.which("redis-sentinel") or SERVER_BIN  # redis-sentinel is redis-server --sentinel
MASTER = "shardmail-test"
DOWN_AFTER_MS = 1000


@dataclass
class Deployment:
    directory: Path
    servers: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)  # port -> redis-server
    sentinels: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)  # port -> redis-sentinel
    primary: int = 0

    @property
    def addresses(self) -> list[str]:
        return [f"127.0.0.1:{port}" for port in self.sentinels]

    def start(self) -> None:
        assert SERVER_BIN and SENTINEL_BIN, "redis-server and redis-sentinel are needed (scripts/setup.sh)"
        self.primary = self._server()
        self._server(replica_of=self.primary)
        for _ in range(3):
            self._sentinel()
        wait_until(self._ready, timeout=30, interval=0.2, what="sentinels seeing the replica and each other")

    def _server(self, replica_of: int | None = None) -> int:
        port = free_port()
        workdir = self.directory / f"redis-{port}"
        workdir.mkdir()
        argv = [SERVER_BIN or "", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(workdir), "--loglevel", "warning", "--logfile", str(workdir / "log")]
        if replica_of:
            argv += ["--replicaof", "127.0.0.1", str(replica_of)]
        self.servers[port] = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
        wait_until(lambda: _answers(port), timeout=10, what=f"redis-server on {port}")
        return port

    def _sentinel(self) -> None:
        port = free_port()
        workdir = self.directory / f"sentinel-{port}"
        workdir.mkdir()
        conf = workdir / "sentinel.conf"  # the sentinel rewrites it: it must be a file of its own
        conf.write_text(f"port {port}\nbind 127.0.0.1\ndir {workdir}\nlogfile {workdir / 'log'}\n"
                        f"sentinel monitor {MASTER} 127.0.0.1 {self.primary} 2\n"
                        f"sentinel down-after-milliseconds {MASTER} {DOWN_AFTER_MS}\n"
                        f"sentinel failover-timeout {MASTER} 10000\n"
                        f"sentinel parallel-syncs {MASTER} 1\n")
        argv = [SENTINEL_BIN or "", str(conf)] + (["--sentinel"] if SENTINEL_BIN == SERVER_BIN else [])
        self.sentinels[port] = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
        wait_until(lambda: _answers(port), timeout=10, what=f"redis-sentinel on {port}")

    def _ready(self) -> bool:
        for port in self.sentinels:
            conn = redis.Redis(port=port, socket_timeout=1, decode_responses=True)
            try:
                replicas = conn.sentinel_slaves(MASTER)
                others = conn.sentinel_sentinels(MASTER)
            except redis.RedisError:
                return False
            if not any(r.get("master-link-status") == "ok" for r in replicas) or len(others) < 2:
                return False
        return True

    def named_primary(self) -> int | None:
        """The primary's port as a majority of the sentinels names it."""
        votes: dict[int, int] = {}
        for port in self.sentinels:
            try:
                found = redis.Redis(port=port, socket_timeout=1).sentinel_get_master_addr_by_name(MASTER)
            except redis.RedisError:
                continue
            if found:
                votes[int(found[1])] = votes.get(int(found[1]), 0) + 1
        best = max(votes.items(), key=lambda item: item[1], default=None)
        return best[0] if best and best[1] >= 2 else None

    def kill_primary(self, timeout: float = 30) -> int:
        """SIGKILL the primary; the port of the replica the sentinels promoted, once they name it
        and it takes writes."""
        old = self.primary
        self.servers[old].send_signal(signal.SIGKILL)
        self.servers[old].wait(10)
        wait_until(lambda: self.named_primary() not in (None, old), timeout=timeout, interval=0.1,
                   what="a replica promoted by the sentinels")
        self.primary = self.named_primary() or 0
        wait_until(lambda: _role(self.primary) == "master", timeout=timeout, interval=0.1, what="the new primary")
        return self.primary

    def stop(self) -> None:
        for proc in [*self.sentinels.values(), *self.servers.values()]:
            if proc.poll() is None:
                proc.terminate()
        for proc in [*self.sentinels.values(), *self.servers.values()]:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _answers(port: int) -> bool:
    try:
        return bool(redis.Redis(port=port, socket_connect_timeout=0.5, socket_timeout=1).ping())
    except redis.RedisError:
        return False


def _role(port: int) -> str | None:
    try:
        role = redis.Redis(port=port, socket_timeout=1).execute_command("ROLE")
    except redis.RedisError:
        return None
    return role[0].decode() if isinstance(role[0], bytes) else str(role[0])


@pytest.fixture
def sentinel_deployment(tmp_path: Path) -> Iterator[Deployment]:
    directory = tmp_path / "sentinel"
    directory.mkdir()
    deployment = Deployment(directory)
    try:
        deployment.start()
        yield deployment
    finally:
        deployment.stop()
