"""SMTP peers for the remote-delivery tests, all on loopback: aiosmtpd sinks that record every
transaction (and can refuse chosen recipients, hold replies, offer STARTTLS), Postfix's
``smtp-sink`` with its fault options, and a listener that accepts and never says a word.

Fixtures (registered in tests/conftest.py): ``sink_factory(host, port=25,
**options) -> Sink``, ``postfix_sink_factory(host, *options, port=25) -> PostfixSink``,
``silent_factory(host, port=25) -> Silent``, ``tls_pair`` (a self-signed certificate and key for
``mx.tls.test``, made with openssl). Everything started is stopped at the end of the test.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from tests.support import die_with_parent, wait_until


@dataclass(frozen=True)
class Transaction:
    sender: str
    recipients: list[str]
    data: bytes  # as received, dot-unstuffed, with the CRLF line ends on the wire
    mail_options: list[str]
    tls: bool
    connection: int
    at: float


@dataclass
class Sink:
    """An aiosmtpd server on ``host:port``; ``rcpt_replies`` maps a recipient to the reply it gets,
    ``data_reply`` replaces the final 250, ``data_delay`` holds the final reply that long."""

    host: str
    port: int = 25
    rcpt_replies: dict[str, str] = field(default_factory=dict)
    data_reply: str = ""
    data_delay: float = 0.0
    smtputf8: bool = True
    size_limit: int | None = None
    tls_context: ssl.SSLContext | None = None
    transactions: list[Transaction] = field(default_factory=list)
    connections: int = 0
    open_now: int = 0
    peak_open: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _controller: Controller | None = None

    # aiosmtpd handler hooks
    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          options: list[str]) -> str:
        reply = self.rcpt_replies.get(address.lower())
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.data_delay:
            await asyncio.sleep(self.data_delay)  # the peer's behaviour under test: a slow server
        with self._lock:
            self.transactions.append(Transaction(
                envelope.mail_from, list(envelope.rcpt_tos), bytes(envelope.original_content or b""),
                list(envelope.mail_options), session.ssl is not None, id(session), time.monotonic()))
        return self.data_reply or "250 2.0.0 Ok: queued"

    def _connected(self, change: int) -> None:
        with self._lock:
            self.open_now += change
            if change > 0:
                self.connections += 1
                self.peak_open = max(self.peak_open, self.open_now)

    def start(self) -> Sink:
        sink = self

        class Counting(SMTP):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                sink._connected(+1)
                super().connection_made(transport)

            def connection_lost(self, exc: Exception | None) -> None:
                sink._connected(-1)
                super().connection_lost(exc)

        class Server(Controller):
            def factory(self) -> SMTP:
                return Counting(self.handler, **self.SMTP_kwargs)

        kwargs: dict[str, object] = {"enable_SMTPUTF8": self.smtputf8, "server_hostname": f"sink-{self.host}",
                                     "ident": "test sink"}
        if self.size_limit is not None:
            kwargs["data_size_limit"] = self.size_limit
        if self.tls_context is not None:
            kwargs["tls_context"] = self.tls_context
        self._controller = Server(self, hostname=self.host, port=self.port, ready_timeout=10, **kwargs)
        self._controller.start()
        wait_until(lambda: self.open_now == 0, 5, "the controller's own readiness connection closed")
        with self._lock:
            self.connections = self.peak_open = 0  # count only what the tests do
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def wait_for(self, count: int, timeout: float = 20.0) -> list[Transaction]:
        wait_until(lambda: len(self.transactions) >= count, timeout, f"{count} transactions at {self.host}")
        return self.transactions

    def recipients(self) -> list[str]:
        return sorted(r for t in self.transactions for r in t.recipients)


@dataclass
class PostfixSink:
    """Postfix's smtp-sink on ``host:port`` with the given options (``-r rcpt``, ``-q .``, ...);
    each message it accepts is dumped into ``dumps``."""

    host: str
    options: tuple[str, ...]
    dumps: Path
    port: int = 25
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> PostfixSink:
        binary = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
        self.dumps.mkdir(parents=True, exist_ok=True)
        shutil.chown(self.dumps, "nobody")
        argv = [binary, "-u", "nobody", "-d", f"{self.dumps}/%H%M%S.", *self.options, f"{self.host}:{self.port}", "64"]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     preexec_fn=die_with_parent)
        wait_until(lambda: self.proc.poll() is not None or _listening(self.host, self.port), 10, "smtp-sink up")
        assert self.proc.poll() is None, self.proc.stderr.read().decode() if self.proc.stderr else "smtp-sink died"
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def accepted(self) -> int:
        return sum(1 for _ in self.dumps.iterdir())


@dataclass
class Silent:
    """Accepts connections and never answers: a hung peer. ``accepted`` counts the connections."""

    host: str
    port: int = 25
    accepted: int = 0
    _sock: socket.socket | None = None
    _held: list[socket.socket] = field(default_factory=list)
    _thread: threading.Thread | None = None

    def start(self) -> Silent:
        self._sock = socket.create_server((self.host, self.port), backlog=256)
        self._sock.settimeout(0.2)
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()
        return self

    def _accept(self) -> None:
        while self._sock is not None:
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._held.append(conn)
            self.accepted += 1

    def stop(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
        if self._thread is not None:
            self._thread.join(5)
        for conn in self._held:
            conn.close()


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture
def sink_factory() -> Iterator[Callable[..., Sink]]:
    started: list[Sink] = []

    def factory(host: str, port: int = 25, **options: object) -> Sink:
        sink = Sink(host, port, **options).start()  # type: ignore[arg-type]
        started.append(sink)
        return sink

    yield factory
    for sink in started:
        sink.stop()


@pytest.fixture
def postfix_sink_factory() -> Iterator[Callable[..., PostfixSink]]:
    started: list[PostfixSink] = []
    # smtp-sink writes its dumps as nobody, who may not enter pytest's 0700 tmp_path: a dir under /tmp
    root = Path(tempfile.mkdtemp(prefix="smtp-sink-"))
    root.chmod(0o755)

    def factory(host: str, *options: str, port: int = 25) -> PostfixSink:
        sink = PostfixSink(host, options, root / f"{host}-{port}", port).start()
        started.append(sink)
        return sink

    yield factory
    for sink in started:
        sink.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def silent_factory() -> Iterator[Callable[..., Silent]]:
    started: list[Silent] = []

    def factory(host: str, port: int = 25) -> Silent:
        silent = Silent(host, port).start()
        started.append(silent)
        return silent

    yield factory
    for silent in started:
        silent.stop()


@dataclass(frozen=True)
class TlsPair:
    cert: Path
    key: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert, self.key)
        return context


@pytest.fixture(scope="session")
def tls_pair(tmp_path_factory: pytest.TempPathFactory) -> TlsPair:
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
                    "/CN=mx.tls.test", "-addext", "subjectAltName=DNS:mx.tls.test", "-keyout", str(key),
                    "-out", str(cert)], check=True, capture_output=True, timeout=60)
    return TlsPair(cert, key)
