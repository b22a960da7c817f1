"""Real servers for the tests: redis-server on a unix socket, shardmail processes on loopback.

Fixtures: ``redis_server`` (one per session, flushed per test via ``redis_url``), ``own_redis`` (a
private redis-server a test may stop and start), ``settings_env`` (the environment that configures
a shardmail process for a test), ``smtpd`` (a running ``shardmail smtpd`` process), ``smtp`` (a raw
SMTP conversation helper). Every wait is a poll with a deadline, never a bare sleep.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from core.config import Settings, load
from core.envelope import Envelope
from tests.support import free_port, wait_until

# real servers: OpenLDAP (slapd, slapd_fresh), Dovecot (dovecot_factory), unbound (dns_server, dns_server_factory),
# SMTP peers (sink_factory, postfix_sink_factory, silent_factory, tls_pair), Redis under Sentinel (sentinel_deployment)
pytest_plugins = ["tests.slapd", "tests.dovecot", "tests.dns_server", "tests.smtp_peers", "tests.sentinel"]
REDIS_BIN = shutil.which("redis-server")


@dataclass
class RedisServer:
    directory: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def socket_path(self) -> Path:
        return self.directory / "redis.sock"

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    def start(self) -> None:
        assert REDIS_BIN, "redis-server is not installed (scripts/setup.sh installs it)"
        self.socket_path.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            [REDIS_BIN, "--port", "0", "--unixsocket", str(self.socket_path), "--save", "", "--appendonly", "no",
             "--dir", str(self.directory), "--loglevel", "warning"],
            stdout=subprocess.DEVNULL,
        )
        conn = self.client()
        wait_until(lambda: _pings(conn))

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None

    def client(self) -> redis.Redis:
        return redis.Redis(unix_socket_path=str(self.socket_path), socket_connect_timeout=1)


def _pings(conn: redis.Redis) -> bool:
    try:
        return bool(conn.ping())
    except redis.RedisError:
        return False


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    directory = tmp_path / "own-redis"
    directory.mkdir()
    server = RedisServer(directory)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    redis_server.client().flushall()
    return redis_server.url


@dataclass
class Node:
    """The configuration of one shardmail node under test, as environment variables."""

    var_dir: Path
    env: dict[str, str]
    port: int = 0
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def settings(self) -> Settings:
        return load(env=self.env)

    def command(self, *args: str, **kwargs: object) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([sys.executable, "-m", "ops.cli", *args], env=self.env, capture_output=True,
                              timeout=60, **kwargs)  # type: ignore[call-overload]

    def start_smtpd(self, **extra_env: str) -> subprocess.Popen[bytes]:
        """An SMTP process logging to ``smtpd-N.log`` beside the var dir (a pipe nobody reads would
        block it once a busy test filled the pipe's buffer)."""
        env = dict(self.env, **extra_env)
        log = self.var_dir.parent / f"smtpd-{len(self.procs)}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "ops.cli", "smtpd"], env=env, stdout=out,
                                    stderr=subprocess.STDOUT)
        self.procs.append(proc)
        wait_until(lambda: proc.poll() is not None or _connectable(self.port), timeout=20)
        assert proc.poll() is None, log.read_text(errors="replace")
        return proc

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def message(self, message_id: str) -> tuple[Envelope, bytes]:
        """A spooled message's envelope and body, from whichever shard holds it."""
        from core.shards import ShardMap

        shard_map = ShardMap(self.settings())
        for shard in shard_map.ids():
            spool = shard_map.spool(shard)
            if spool.path(message_id).exists():
                return spool.load(message_id)
        raise FileNotFoundError(message_id)

    def spooled(self) -> list[str]:
        from core.shards import ShardMap

        shard_map = ShardMap(self.settings())
        return sorted(i for s in shard_map.ids() for i in shard_map.spool(s).ids())


def _connectable(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


CATCHALL_LDIF = """dn: mail=catchall@test.example,dc=test
objectClass: inetOrgPerson
objectClass: qmailUser
cn: catchall
sn: catchall
mail: catchall@test.example
mailAlternateAddress: catchall@localhost
mailMessageStore: catchall/
"""


def make_node(tmp_path: Path, redis_url: str, **overrides: str) -> Node:
    """A node whose local domains take any address (one catchall entry in its users.ldif)."""
    port = free_port()
    tmp_path.mkdir(parents=True, exist_ok=True)
    users = tmp_path / "users.ldif"
    users.write_text(CATCHALL_LDIF)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHARDMAIL_")}
    env.update({
        "SHARDMAIL_VAR_DIR": str(tmp_path / "var"),
        "SHARDMAIL_REDIS_URL": redis_url,
        "SHARDMAIL_SMTP_LISTEN": f"127.0.0.1:{port}",
        "SHARDMAIL_ME": "mx.test.example",
        "SHARDMAIL_NODE": "n1",
        "SHARDMAIL_LOCALS": "test.example,localhost",
        "SHARDMAIL_RCPTHOSTS": "hosted.example,.sub.example",
        "SHARDMAIL_SHARDS": "2",
        "SHARDMAIL_INGRESS_THREADS": "4",
        "SHARDMAIL_USERS_LDIF": str(users),
    })
    env.update({f"SHARDMAIL_{k.upper()}": v for k, v in overrides.items()})
    return Node(tmp_path / "var", env, port)


@pytest.fixture
def node_factory(tmp_path: Path, redis_url: str) -> Iterator[Callable[..., Node]]:
    nodes: list[Node] = []

    def factory(redis_url: str = redis_url, **overrides: str) -> Node:
        node = make_node(tmp_path / f"node{len(nodes)}", redis_url, **overrides)
        nodes.append(node)
        return node

    yield factory
    for node in nodes:
        node.stop()


@pytest.fixture
def smtpd(node_factory: Callable[..., Node]) -> Node:
    node = node_factory()
    node.start_smtpd()
    return node


class Conversation:
    """A raw SMTP client: send bytes exactly as given, read whole (multi-line) replies."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buffer = b""
        self.greeting = self.reply()

    def send(self, data: bytes | str) -> None:
        self.sock.sendall(data.encode() if isinstance(data, str) else data)

    def _line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"connection closed; pending {self.buffer!r}")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    def reply(self) -> str:
        lines = []
        while True:
            line = self._line().decode("utf-8", "replace")
            lines.append(line)
            if len(line) < 4 or line[3] != "-":
                return "\n".join(lines)

    def cmd(self, line: str) -> str:
        self.send(line + "\r\n")
        return self.reply()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def smtp(smtpd: Node) -> Iterator[Callable[[], Conversation]]:
    opened: list[Conversation] = []

    def connect() -> Conversation:
        conversation = Conversation(smtpd.port)
        opened.append(conversation)
        return conversation

    yield connect
    for conversation in opened:
        conversation.close()
