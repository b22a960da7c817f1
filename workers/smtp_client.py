"""The outgoing SMTP client: one connection to one hop, any number of transactions on it.

Interface: ``Peer`` (what a hop is: host name, address, port), ``ClientSettings.from_settings(s)``,
``open_session(peer, client) -> Session`` (connect, greeting, EHLO/HELO, opportunistic STARTTLS),
``Session.send(sender, recipients, data, smtputf8) -> list[Outcome]`` (one transaction, an outcome
per recipient), ``Session.quit()``, ``Session.abort()``; ``wire_data(body) -> bytes`` (normalised
and dot-stuffed); ``HopFailure`` (this hop cannot be used: try the next one).

Protocol: EHLO, or HELO when EHLO is refused; STARTTLS when the peer offers it and ``tlsremote`` is
not ``none`` (``may``: unverified, and a refused or failed handshake falls back to plain text on
a new connection; ``verify``: the certificate must check against ``tlscafile`` or the system's CAs,
else the hop fails with 4.7.5); ``SIZE`` (a message larger than the peer's limit fails 5.3.4
without being sent), ``8BITMIME`` (``BODY=8BITMIME`` for 8-bit content), ``SMTPUTF8`` (a message
that needs it, to a peer without it, fails 5.6.7: never a silent downgrade), ``PIPELINING`` (MAIL,
every RCPT and DATA in one write, RFC 2920). Each stage has RFC 5321 4.5.3.2's timeout, capped by
``timeoutremote``. Data leaves with CRLF line ends only (a bare CR or LF becomes CRLF) and
dot-stuffed.

Outcomes, per recipient, through core.outcome's one classifier (``from_reply``): a 4xx/5xx to MAIL
or DATA applies to every recipient of the transaction, one to RCPT to that recipient, the final
reply to every recipient whose RCPT was accepted. A connection lost or timing out in the middle
of a transaction defers its recipients (after "." that may mean one duplicate: RFC 1047).

Failures: connect errors, timeouts, a greeting or EHLO that is not 2xx, and TLS trouble before
the first transaction are ``HopFailure`` (always temporary). ``Session.send`` never raises for the
peer's behaviour; ``StaleSession`` is raised only when a reused connection turns out to be dead
before the peer accepted anything, so the caller can simply open a new one.

Settings: ``helohost`` (default ``me``), ``timeoutconnect``, ``timeoutremote``, ``tlsremote``,
``tlscafile``.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
from dataclasses import dataclass, field

from core.config import Settings
from core.outcome import Deferred, Failed, Outcome, from_reply

# RFC 5321 4.5.3.2 (seconds)
GREETING_TIMEOUT = 300
MAIL_TIMEOUT = 300
RCPT_TIMEOUT = 300
DATA_INIT_TIMEOUT = 120
DATA_BLOCK_TIMEOUT = 180
DATA_END_TIMEOUT = 600
LINE_LIMIT = 4096  # a reply line longer than this is a broken peer
REPLY_LINES = 200  # nor may a reply go on for ever
_BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")


@dataclass(frozen=True, slots=True)
class Peer:
    host: str  # the name we looked up (for TLS and logs)
    address: str  # what we connect to
    port: int

    def __str__(self) -> str:
        return f"{self.host}[{self.address}]:{self.port}"


@dataclass(frozen=True, slots=True)
class ClientSettings:
    helo: str
    connect_timeout: float
    cap: float  # no stage waits longer than this
    tls: str  # none | may | verify
    cafile: str = ""

    @classmethod
    def from_settings(cls, settings: Settings) -> ClientSettings:
        return cls(settings.helohost or settings.me, settings.timeoutconnect, settings.timeoutremote,
                   settings.tlsremote, settings.tlscafile)

    def timeout(self, stage: float) -> float:
        return min(stage, self.cap)


class HopFailure(Exception):
    """This hop cannot take mail now (connection, greeting, EHLO, TLS): try the next one."""

    def __init__(self, outcome: Deferred) -> None:
        super().__init__(outcome.text)
        self.outcome = outcome


class StaleSession(Exception):
    """A reused connection was found closed before the peer accepted anything."""


class _Lost(Exception):
    """The connection broke or timed out during a command."""


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    lines: tuple[str, ...]  # the text of each line, without the code

    @property
    def text(self) -> str:
        return " ".join(self.lines)

    def outcome(self, peer: Peer, stage: str) -> Outcome:
        return from_reply(self.code, f"{self.text} (host {peer} in reply to {stage})")


def wire_data(body: bytes) -> bytes:
    """The DATA payload: CRLF line ends only, a CRLF at the end, leading dots doubled, and ".\r\n"."""
    if b"\r" in body.replace(b"\r\n", b"") or b"\n" in body.replace(b"\r\n", b""):
        body = _BARE.sub(b"\r\n", body)
    if body and not body.endswith(b"\r\n"):
        body += b"\r\n"
    if body.startswith(b"."):
        body = b"." + body
    return body.replace(b"\r\n.", b"\r\n..") + b".\r\n"


def _context(mode: str, cafile: str) -> ssl.SSLContext:
    if mode == "verify":
        return ssl.create_default_context(cafile=cafile or None)
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # opportunistic: encryption without authentication (RFC 7435)
    return context


@dataclass
class Session:
    peer: Peer
    client: ClientSettings
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    extensions: dict[str, str] = field(default_factory=dict)
    tls: bool = False
    transactions: int = 0
    dirty: bool = False  # the last transaction did not end cleanly: RSET before the next

    # -- plumbing -------------------------------------------------------------------------------
    async def _reply(self, timeout: float) -> Reply:
        lines: list[str] = []
        code = 0
        try:
            async with asyncio.timeout(self.client.timeout(timeout)):
                while True:
                    raw = await self.reader.readuntil(b"\n")
                    line = raw.rstrip(b"\r\n").decode("utf-8", "replace")
                    if len(line) < 3 or not line[:3].isdigit():
                        return Reply(451, (f"malformed reply {line[:100]!r}",))
                    code = int(line[:3])
                    lines.append(line[4:].strip())
                    if len(line) < 4 or line[3] != "-" or len(lines) >= REPLY_LINES:
                        return Reply(code, tuple(lines))
        except TimeoutError:
            raise _Lost("timed out waiting for a reply") from None
        except asyncio.LimitOverrunError:
            raise _Lost("reply line too long") from None
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as exc:
            raise _Lost(f"connection lost ({type(exc).__name__})") from None

    async def _send(self, data: bytes, timeout: float = DATA_BLOCK_TIMEOUT) -> None:
        try:
            self.writer.write(data)
            async with asyncio.timeout(self.client.timeout(timeout)):
                await self.writer.drain()
        except TimeoutError:
            raise _Lost("timed out sending") from None
        except (ConnectionError, OSError, RuntimeError) as exc:
            raise _Lost(f"connection lost while sending ({type(exc).__name__})") from None

    async def _command(self, line: str, timeout: float) -> Reply:
        await self._send(line.encode("utf-8") + b"\r\n")
        return await self._reply(timeout)

    # -- the session ----------------------------------------------------------------------------
    async def hello(self) -> None:
        reply = await self._command(f"EHLO {self.client.helo}", MAIL_TIMEOUT)
        if reply.code == 250:
            self.extensions = _extensions(reply.lines)
            return
        if 500 <= reply.code < 600:
            reply = await self._command(f"HELO {self.client.helo}", MAIL_TIMEOUT)
            if reply.code == 250:
                self.extensions = {}
                return
        raise HopFailure(Deferred("4.4.0", f"{self.peer} refused our greeting: {reply.code} {reply.text}"))

    async def send(self, sender: str, recipients: list[str], data: bytes, smtputf8: bool) -> list[Outcome]:
        """One transaction; ``data`` comes from ``wire_data``. An outcome per recipient."""
        reused = self.transactions > 0
        self.transactions += 1
        ext = self.extensions
        if smtputf8 and "SMTPUTF8" not in ext:
            return [Failed("5.6.7", f"host {self.peer} does not support SMTPUTF8, which this message needs")
                    ] * len(recipients)
        limit = ext.get("SIZE", "")
        if limit.isdigit() and int(limit) and len(data) > int(limit):
            return [Failed("5.3.4", f"message of {len(data)} bytes exceeds the {limit} bytes that host "
                                    f"{self.peer} accepts")] * len(recipients)
        params = f" SIZE={len(data)}" if "SIZE" in ext else ""
        if "8BITMIME" in ext and not data.isascii():
            params += " BODY=8BITMIME"
        if smtputf8:
            params += " SMTPUTF8"
        mail = f"MAIL FROM:<{sender}>{params}"
        rcpts = [f"RCPT TO:<{r}>" for r in recipients]
        pipelined = "PIPELINING" in ext
        opening = [mail, *rcpts, "DATA"] if pipelined else [mail]
        if self.dirty:
            opening.insert(0, "RSET")
        try:
            replies = await self._opening(opening, reused, pipelined)
            if self.dirty:
                replies.pop(0)  # RSET's reply: whatever it says, MAIL's tells
                self.dirty = False
            mail_reply = replies[0]
            if pipelined:
                return await self._finish(mail_reply, replies[1:-1], replies[-1], data)
            if mail_reply.code != 250:
                return await self._finish(mail_reply, [mail_reply] * len(rcpts), None, data)
            rcpt_replies = [await self._command(r, RCPT_TIMEOUT) for r in rcpts]
            data_reply = None
            if any(r.code in (250, 251) for r in rcpt_replies):
                data_reply = await self._command("DATA", DATA_INIT_TIMEOUT)
            return await self._finish(mail_reply, rcpt_replies, data_reply, data)
        except StaleSession:
            self.abort()
            raise
        except _Lost as exc:
            self.abort()
            return [Deferred("4.4.2", f"host {self.peer}: {exc}")] * len(recipients)

    async def _opening(self, lines: list[str], reused: bool, pipelined: bool) -> list[Reply]:
        """Send the transaction's first command(s) (in one write when the peer pipelines) and read a
        reply to each. On a reused connection, a loss before the first reply means the peer had
        closed it while idle: it accepted nothing, so the caller may open a new one."""
        timeouts = {"RSET": MAIL_TIMEOUT, "DATA": DATA_INIT_TIMEOUT}
        batches = [lines] if pipelined else [[line] for line in lines]
        replies: list[Reply] = []
        for batch in batches:
            try:
                await self._send(("\r\n".join(batch) + "\r\n").encode("utf-8"), MAIL_TIMEOUT)
                for line in batch:
                    replies.append(await self._reply(timeouts.get(line.split(" ", 1)[0], RCPT_TIMEOUT)))
            except _Lost as exc:
                if reused and not replies:
                    raise StaleSession(str(exc)) from None
                raise
        return replies

    async def _finish(self, mail_reply: Reply, rcpt_replies: list[Reply], data_reply: Reply | None,
                      data: bytes) -> list[Outcome]:
        if mail_reply.code != 250:
            self.dirty = True
            if data_reply is not None and data_reply.code == 354:
                await self._send(b".\r\n")
                await self._reply(DATA_END_TIMEOUT)
            return [mail_reply.outcome(self.peer, "MAIL FROM")] * len(rcpt_replies)
        accepted = [r.code in (250, 251) for r in rcpt_replies]
        outcomes: list[Outcome] = [
            Deferred("4.0.0", "") if ok else r.outcome(self.peer, "RCPT TO") for r, ok in zip(rcpt_replies, accepted,
                                                                                               strict=True)]
        if not any(accepted):
            self.dirty = True
            if data_reply is not None and data_reply.code == 354:  # a peer that wants data with no recipient
                await self._send(b".\r\n")
                await self._reply(DATA_END_TIMEOUT)
            return outcomes
        assert data_reply is not None
        if data_reply.code != 354:
            self.dirty = True
            final = data_reply.outcome(self.peer, "DATA")
        else:
            await self._send(data, DATA_BLOCK_TIMEOUT)
            try:
                reply = await self._reply(DATA_END_TIMEOUT)
            except _Lost as exc:
                self.abort()
                final = Deferred("4.4.2", f"host {self.peer}: {exc} after end of data; may be delivered twice")
            else:
                final = reply.outcome(self.peer, "end of DATA")
        return [final if ok else outcome for outcome, ok in zip(outcomes, accepted, strict=True)]

    def alive(self) -> bool:
        return not self.reader.at_eof() and not self.writer.is_closing()

    async def quit(self) -> None:
        with contextlib.suppress(_Lost, HopFailure):
            if self.alive():
                await self._send(b"QUIT\r\n", 5)
                await self._reply(5)
        self.abort()

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


def _extensions(lines: tuple[str, ...]) -> dict[str, str]:
    """EHLO keywords (upper case) and their parameters, from the reply lines after the first."""
    found = {}
    for line in lines[1:]:
        keyword, _, params = line.strip().partition(" ")
        if keyword:
            found[keyword.upper()] = params.strip()
    return found


async def _connect(peer: Peer, client: ClientSettings) -> Session:
    try:
        async with asyncio.timeout(client.connect_timeout):
            reader, writer = await asyncio.open_connection(peer.address, peer.port, limit=LINE_LIMIT)
    except TimeoutError:
        raise HopFailure(Deferred("4.4.1", f"connect to {peer}: timed out")) from None
    except OSError as exc:
        raise HopFailure(Deferred("4.4.1", f"connect to {peer}: {exc.strerror or exc}")) from None
    session = Session(peer, client, reader, writer)
    try:
        greeting = await session._reply(GREETING_TIMEOUT)
    except _Lost as exc:
        session.abort()
        raise HopFailure(Deferred("4.4.2", f"host {peer} greeting: {exc}")) from None
    if greeting.code != 220:
        session.abort()
        raise HopFailure(Deferred("4.4.0", f"host {peer} greeted us with {greeting.code} {greeting.text}"))
    return session


async def open_session(peer: Peer, client: ClientSettings) -> Session:
    """A greeted session, after EHLO (and STARTTLS when the peer offers it and the settings allow).
    Raises HopFailure."""
    tls = client.tls != "none"
    while True:
        session = await _connect(peer, client)
        try:
            await session.hello()
            if not tls or "STARTTLS" not in session.extensions:
                if client.tls == "verify":
                    raise HopFailure(Deferred("4.7.4", f"host {peer} offers no STARTTLS (tlsremote = verify)"))
                return session
            reply = await session._command("STARTTLS", MAIL_TIMEOUT)
            if reply.code != 220:
                if client.tls == "verify":
                    raise HopFailure(Deferred("4.7.4", f"host {peer} refused STARTTLS: {reply.code} {reply.text}"))
                return session  # opportunistic: go on in plain text on this connection
            try:
                async with asyncio.timeout(client.timeout(GREETING_TIMEOUT)):
                    await session.writer.start_tls(_context(client.tls, client.cafile), server_hostname=peer.host)
            except (ssl.SSLError, OSError, TimeoutError, ConnectionError) as exc:
                session.abort()
                if client.tls == "verify":
                    raise HopFailure(Deferred("4.7.5", f"TLS with {peer} failed: {exc}")) from None
                tls = False  # "may": the next connection to this hop goes without TLS
                continue
            session.tls = True
            await session.hello()  # RFC 3207: everything learnt before STARTTLS is forgotten
            return session
        except _Lost as exc:
            session.abort()
            raise HopFailure(Deferred("4.4.2", f"host {peer}: {exc} before any transaction")) from None
        except HopFailure:
            session.abort()
            raise
