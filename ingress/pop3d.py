"""``shardmail pop3d``: the POP3 server for the Maildirs local delivery writes.

Interface: ``main(settings)`` serves ``pop3_listen`` (STLS offered when a certificate is
configured) and ``pop3s_listen`` (TLS from the first byte, port 995 style) until SIGTERM/SIGINT;
``Pop3Service(settings, authenticator, directory, tls)`` with ``handle(reader, writer, tls_now)``
(one session). ``shardmail run`` starts one when either list is set.

Protocol: RFC 1939 (USER, PASS, STAT, LIST, RETR, DELE, NOOP, RSET, QUIT, TOP, UIDL; no APOP, which
needs the clear password), RFC 2449 (CAPA, RESP-CODES, AUTH-RESP-CODE, PIPELINING), RFC 2595
(STLS) and RFC 5034 (AUTH PLAIN, with or without the initial response). Logins go through the
same ``core.auth.Authenticator`` as SMTP AUTH: the same password schemes, ``ldaprebind``,
accountStatus rules (plus qmail-ldap's ``nopop``: the right password, but no POP access), the same
Redis failure throttle (a guesser is throttled across SMTP and POP3 together) and the same
``authfaildelay``. Without TLS, USER/PASS and AUTH are refused (``-ERR [AUTH]``) and not
advertised, unless ``pop3plaintext``. The mailbox is the user's ``mailMessageStore`` under
``ldapmessagestore`` (core.directory ``resolve_store``); its semantics and lock are
ingress.pop3_mailbox's: a second session on it gets ``-ERR [IN-USE]``. A user whose ``mailHost``
is another node gets ``-ERR [SYS/TEMP]`` (forwarding the session is not done here).

Replies on the wire always end in CRLF; RETR and TOP send the message with CRLF line ends and
lines starting with "." doubled.

Limits: a silent client is logged out after ``pop3timeout`` seconds (nothing deleted); a command
line is at most 255 octets (RFC 2449), a SASL line 8192; ``MAX_ERRORS`` refused commands end the
session; ``pop3maxsessions`` sessions per process and ``pop3maxperip`` per client address (over:
``-ERR [SYS/TEMP]`` and close); per user one, by the mailbox lock.

Failures: bad input (unknown command, a command in the wrong state, an over-long line, a NUL, a bad
or deleted message number, a message gone from disk) is ``-ERR`` and the session goes on; the
directory or Redis unavailable is ``-ERR [SYS/TEMP]``; a disk error ``-ERR [SYS/TEMP]``; an
unexpected exception is logged and ends that session only. A listener that cannot bind, or
``pop3s_listen`` without a certificate, is fatal at start (exit 78).

Settings: ``pop3_listen``, ``pop3s_listen``, ``pop3plaintext``, ``pop3timeout``,
``pop3maxsessions``, ``pop3maxperip``, ``tlscert``, ``tlskey``, ``ldapmessagestore``, ``me``,
``clusterhosts``, plus those of core.auth and core.directory.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import functools
import logging
import re
import ssl
from base64 import b64decode
from typing import cast

from core import sdnotify
from core.auth import Authenticator, AuthResult, AuthThrottle
from core.config import Settings
from core.directory import (
    AmbiguousAddress,
    Directory,
    DirectoryUnavailable,
    UnsafeStore,
    open_directory,
    resolve_store,
)
from core.redis_conn import connect_shared
from ingress.pop3_mailbox import Mailbox, MailboxBusy, Message
from ingress.serve import listening_socket, run_on_uvloop, serve_until_stopped
from ingress.tls import TLSConfigError, server_context

log = logging.getLogger("shardmail.pop3d")
COMMAND_LIMIT = 255  # octets, CRLF included (RFC 2449)
SASL_LIMIT = 8192  # a base64 SASL response line
MAX_ERRORS = 20
TOO_LONG = b"\x00too long"  # a sentinel no real line can be (NUL is refused anyway)
_DOT_LINE = re.compile(rb"^\.", re.MULTILINE)


def stuffed(data: bytes) -> bytes:
    """RFC 1939 byte-stuffing: a line that starts with "." gets another in front."""
    return _DOT_LINE.sub(b"..", data) if data.startswith(b".") or b"\n." in data else data


class Closing(Exception):
    """The session ends now (reply already sent, or the client is gone)."""


class Session:
    def __init__(self, service: Pop3Service, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 peer: str, tls_now: bool) -> None:
        self.service = service
        self.settings = service.settings
        self.reader = reader
        self.writer = writer
        self.peer = peer
        self.tls = tls_now
        self.user = ""  # from USER
        self.login = ""  # authenticated as
        self.mailbox: Mailbox | None = None
        self.deleted: set[int] = set()
        self.errors = 0
        self.retrieved = 0

    # -- the wire ---------------------------------------------------------------------------

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        try:
            await asyncio.wait_for(self.writer.drain(), self.settings.pop3timeout)
        except (TimeoutError, ConnectionError, OSError):
            raise Closing from None

    async def reply(self, text: str) -> None:
        await self.send(text.encode("utf-8", "surrogateescape") + b"\r\n")

    async def error(self, text: str) -> None:
        self.errors += 1
        await self.reply("-ERR " + text)
        if self.errors >= MAX_ERRORS:
            await self.reply("-ERR too many errors, closing")
            raise Closing

    async def line(self, limit: int = COMMAND_LIMIT) -> bytes:
        """One line without its line end; ``TOO_LONG`` for a line over ``limit`` (read and dropped).
        Raises ``Closing`` at EOF or after ``pop3timeout`` seconds of silence."""
        too_long = False
        while True:
            try:
                raw = await asyncio.wait_for(self.reader.readuntil(b"\n"), self.settings.pop3timeout)
            except asyncio.LimitOverrunError as exc:
                too_long = True
                with contextlib.suppress(asyncio.IncompleteReadError):
                    await asyncio.wait_for(self.reader.readexactly(exc.consumed), self.settings.pop3timeout)
                continue
            except TimeoutError:
                log.info("POP3 client %s idle for %d s: logged out", self.peer, self.settings.pop3timeout)
                with contextlib.suppress(Closing):
                    await self.reply("-ERR [SYS/TEMP] idle for too long, logged out")  # RFC 1939: no UPDATE
                raise Closing from None
            except (asyncio.IncompleteReadError, ConnectionError, OSError):
                raise Closing from None
            if too_long or len(raw) > limit:
                return TOO_LONG
            return raw.rstrip(b"\r\n")

    # -- the dialogue -------------------------------------------------------------------------

    async def run(self) -> None:
        await self.reply(f"+OK {self.settings.me} shardmail POP3 ready")
        while True:
            raw = await self.line()
            if raw is TOO_LONG:
                await self.error(f"command line too long ({COMMAND_LIMIT} octets at most)")
                continue
            if b"\x00" in raw:
                await self.error("NUL in command")
                continue
            text = raw.decode("utf-8", "surrogateescape")  # PASS gets its bytes back, whatever the charset
            verb, _, argument = text.partition(" ")
            verb = verb.upper()
            handler = getattr(self, f"_{'trans' if self.mailbox else 'auth'}_{verb.lower()}", None)
            if handler is None or not verb.isalpha():
                known = verb.isalpha() and any(hasattr(self, f"_{s}_{verb.lower()}") for s in ("auth", "trans"))
                await self.error("command not valid in this state" if known else "unknown command")
                continue
            await handler(argument)

    def _plaintext_ok(self) -> bool:
        return self.tls or self.settings.pop3plaintext

    async def _capa(self, _: str = "") -> None:
        lines = ["TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING", "IMPLEMENTATION shardmail"]
        if self.mailbox is None:
            if self._plaintext_ok():
                lines += ["USER", "SASL PLAIN"]
            if self.service.tls is not None and not self.tls:
                lines.append("STLS")
        await self.send(b"".join(f"{line}\r\n".encode() for line in ["+OK capability list follows", *lines, "."]))

    _auth_capa = _trans_capa = _capa

    async def _auth_quit(self, _: str) -> None:
        await self.reply("+OK bye")
        raise Closing

    async def _auth_stls(self, _: str) -> None:
        if self.service.tls is None:
            await self.error("STLS not available (no certificate)")
            return
        if self.tls:
            await self.error("TLS already active")
            return
        # Read nothing more in plain text: the client's handshake may follow our +OK at once, and
        # bytes read before start_tls would land in the plain-text buffer, lost to TLS (a hung
        # handshake). start_tls resumes reading for the TLS layer.
        cast(asyncio.Transport, self.writer.transport).pause_reading()
        buffered = getattr(self.reader, "_buffer", None)
        if buffered:  # sent with STLS, before our +OK: never to count as said inside TLS (RFC 2595 §3.1)
            buffered.clear()
        await self.reply("+OK begin TLS")
        try:
            await asyncio.wait_for(self.writer.start_tls(self.service.tls), self.settings.pop3timeout)
        except (TimeoutError, ssl.SSLError, ConnectionError, OSError) as exc:
            log.info("POP3 STLS with %s failed: %s", self.peer, exc)
            raise Closing from None
        self.tls, self.user = True, ""

    async def _auth_user(self, argument: str) -> None:
        if not self._plaintext_ok():
            await self.error("[AUTH] plain-text login refused before STLS")
            return
        if not argument.strip():
            await self.error("USER needs a name")
            return
        self.user = argument.strip()
        await self.reply("+OK send PASS")

    async def _auth_pass(self, argument: str) -> None:
        if not self._plaintext_ok():
            await self.error("[AUTH] plain-text login refused before STLS")
            return
        if not self.user:
            await self.error("USER first")
            return
        login, self.user = self.user, ""
        await self._login(login, argument.encode("utf-8", "surrogateescape"))

    async def _auth_auth(self, argument: str) -> None:
        mechanism, _, initial = argument.strip().partition(" ")
        if not mechanism:
            await self.send(b"+OK SASL mechanisms follow\r\nPLAIN\r\n.\r\n")
            return
        if mechanism.upper() != "PLAIN":
            await self.error("unsupported SASL mechanism")
            return
        if not self._plaintext_ok():
            await self.error("[AUTH] plain-text login refused before STLS")
            return
        if not initial:
            await self.send(b"+ \r\n")
            raw = await self.line(SASL_LIMIT)
            if raw is TOO_LONG:
                await self.error("[AUTH] SASL response too long")
                return
            initial = raw.decode("ascii", "replace").strip()
        if initial == "*":
            await self.error("[AUTH] authentication cancelled")
            return
        try:
            blob = b"" if initial == "=" else b64decode(initial.encode("ascii", "replace"), validate=True)
        except (binascii.Error, ValueError):
            await self.error("[AUTH] invalid base64")
            return
        parts = blob.split(b"\x00")
        if len(parts) != 3 or not parts[1]:
            await self.error("[AUTH] malformed PLAIN response")
            return
        if parts[0] and parts[0] != parts[1]:
            await self.error("[AUTH] authorization identity must be empty or the login")
            return
        await self._login(parts[1].decode("utf-8", "replace"), parts[2])

    async def _login(self, login: str, password: bytes) -> None:
        verdict = await self.service.authenticator.verify(login, password, self.peer)
        if verdict.result is AuthResult.BLOCKED:
            log.warning("POP3 login for %r from %s blocked: %s", login[:100], self.peer, verdict.reason)
            await self.reply("-ERR [SYS/TEMP] too many failed logins, try again later")
            raise Closing
        if verdict.result is AuthResult.TEMPORARY:
            await self.error("[SYS/TEMP] authentication unavailable, try again later")
            return
        if not verdict.ok:
            log.warning("POP3 login failed for %r from %s: %s", login[:100], self.peer, verdict.reason)
            await self.error("[AUTH] authentication failed")
            return
        await self._open(verdict.mail or login)

    async def _open(self, mail: str) -> None:
        settings = self.settings
        try:
            user = await asyncio.to_thread(self.service.directory.lookup, mail)
        except (DirectoryUnavailable, AmbiguousAddress) as exc:
            log.warning("POP3 mailbox look-up for %s: %s", mail, exc)
            await self.error("[SYS/TEMP] directory unavailable, try again later")
            return
        if user is None or not user.message_store:
            await self.error("[SYS/PERM] no mailbox for this account")
            return
        if user.status == "nopop":
            await self.error("[AUTH] POP access disabled for this account")
            return
        if user.host and user.host not in self.service.own_names:
            log.warning("POP3 login as %s here, but its mailHost is %s", mail, user.host)
            await self.error("[SYS/TEMP] this mailbox is served by another node")
            return
        try:
            path = resolve_store(settings.message_store_root, user.message_store)
            self.mailbox = await asyncio.to_thread(Mailbox.open, path)
        except MailboxBusy:
            log.info("POP3 mailbox of %s in use, refused %s", mail, self.peer)
            await self.error("[IN-USE] mailbox in use by another session")
            return
        except UnsafeStore as exc:
            log.error("POP3 mailbox of %s: %s", mail, exc)
            await self.error("[SYS/PERM] mailbox location misconfigured")
            return
        except OSError as exc:
            log.error("POP3 mailbox of %s: %s", mail, exc)
            await self.error("[SYS/TEMP] mailbox unavailable, try again later")
            return
        self.login = mail
        count = len(self.mailbox.messages)
        log.info("POP3 login as %s from %s: %d messages", mail, self.peer, count)
        await self.reply(f"+OK {count} messages")

    # -- TRANSACTION ---------------------------------------------------------------------------

    async def _message(self, argument: str) -> Message | None:
        """The message an argument names, or None after the -ERR saying why."""
        assert self.mailbox is not None
        text = argument.strip()
        if not text.isdigit() or len(text) > 9:
            await self.error("invalid message number")
            return None
        message = self.mailbox.get(int(text))
        if message is None:
            await self.error("no such message")
        elif message.number in self.deleted:
            await self.error(f"message {message.number} already deleted")
            return None
        return message

    def _live(self) -> list[Message]:
        assert self.mailbox is not None
        return [m for m in self.mailbox.messages if m.number not in self.deleted]

    async def _measured(self, message: Message | None = None) -> bool:
        """Sizes known (of ``message``, else of all), or False after the -ERR."""
        assert self.mailbox is not None
        try:
            if message is None:
                await asyncio.to_thread(self.mailbox.measure_all)
            elif message.size < 0:
                await asyncio.to_thread(self.mailbox.measure, message)
        except OSError as exc:
            log.error("POP3 mailbox of %s: %s", self.login, exc)
            await self.error("[SYS/TEMP] mailbox read failed")
            return False
        return True

    async def _trans_stat(self, _: str) -> None:
        if await self._measured():
            live = self._live()
            await self.reply(f"+OK {len(live)} {sum(m.size for m in live)}")

    async def _trans_list(self, argument: str) -> None:
        if argument.strip():
            message = await self._message(argument)
            if message is not None and await self._measured(message):
                await self.reply(f"+OK {message.number} {message.size}")
            return
        if await self._measured():
            live = self._live()
            lines = [f"+OK {len(live)} messages", *(f"{m.number} {m.size}" for m in live), "."]
            await self.send("".join(f"{line}\r\n" for line in lines).encode())

    async def _trans_uidl(self, argument: str) -> None:
        if argument.strip():
            message = await self._message(argument)
            if message is not None:
                await self.reply(f"+OK {message.number} {message.uid}")
            return
        lines = ["+OK unique-id listing follows", *(f"{m.number} {m.uid}" for m in self._live()), "."]
        await self.send("".join(f"{line}\r\n" for line in lines).encode("utf-8", "surrogateescape"))

    async def _trans_retr(self, argument: str) -> None:
        message = await self._message(argument)
        if message is not None:
            await self._transmit(message, None)

    async def _trans_top(self, argument: str) -> None:
        number, _, lines = argument.strip().partition(" ")
        if not lines.strip().isdigit():
            await self.error("TOP needs a message number and a count of lines")
            return
        message = await self._message(number)
        if message is not None:
            await self._transmit(message, min(int(lines.strip()[:12]), 2**31))

    async def _transmit(self, message: Message, lines: int | None) -> None:
        assert self.mailbox is not None
        try:
            if lines is None:
                data = await asyncio.to_thread(self.mailbox.wire, message)
            else:
                data = await asyncio.to_thread(self.mailbox.top, message, lines)
        except OSError as exc:
            log.error("POP3 mailbox of %s: %s", self.login, exc)
            await self.error("[SYS/TEMP] message read failed")
            return
        if data is None:
            await self.error("no such message (removed by another reader)")
            return
        if lines is None:
            self.retrieved += 1
            message.size = len(data)
            await self.send(f"+OK {len(data)} octets\r\n".encode() + stuffed(data) + b".\r\n")
        else:
            await self.send(b"+OK top of message follows\r\n" + stuffed(data) + b".\r\n")

    async def _trans_dele(self, argument: str) -> None:
        message = await self._message(argument)
        if message is not None:
            self.deleted.add(message.number)
            await self.reply(f"+OK message {message.number} deleted")

    async def _trans_rset(self, _: str) -> None:
        self.deleted.clear()
        await self.reply(f"+OK {len(self._live())} messages")

    async def _trans_noop(self, _: str) -> None:
        await self.reply("+OK")

    async def _trans_quit(self, _: str) -> None:
        assert self.mailbox is not None
        try:
            failed = await asyncio.to_thread(self.mailbox.expunge, self.deleted)
        except OSError as exc:
            log.error("POP3 mailbox of %s: removing deleted messages: %s", self.login, exc)
            failed = len(self.deleted)
        log.info("POP3 QUIT by %s from %s: %d RETR, %d deleted", self.login, self.peer, self.retrieved,
                 len(self.deleted) - failed)
        self.deleted.clear()
        if failed:
            await self.reply(f"-ERR [SYS/TEMP] {failed} deleted messages not removed")
        else:
            await self.reply("+OK bye")
        raise Closing

    def close(self) -> None:
        if self.mailbox is not None:
            self.mailbox.close()
            self.mailbox = None


class Pop3Service:
    def __init__(self, settings: Settings, authenticator: Authenticator, directory: Directory,
                 tls: ssl.SSLContext | None) -> None:
        self.settings = settings
        self.authenticator = authenticator
        self.directory = directory
        self.tls = tls
        self.own_names = {settings.me.lower(), *(h.lower() for h in settings.clusterhosts)}
        self.sessions = 0
        self.per_ip: dict[str, int] = {}

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, tls_now: bool) -> None:
        peer = str((writer.get_extra_info("peername") or ("",))[0])
        self.sessions += 1
        self.per_ip[peer] = self.per_ip.get(peer, 0) + 1
        session = Session(self, reader, writer, peer, tls_now)
        try:
            if self.sessions > self.settings.pop3maxsessions or self.per_ip[peer] > self.settings.pop3maxperip:
                log.warning("POP3 client %s refused: too many sessions", peer)
                await session.reply("-ERR [SYS/TEMP] too many sessions, try again later")
                return
            await session.run()
        except Closing:
            pass
        except Exception:
            log.exception("POP3 session with %s failed", peer)
        finally:
            session.close()  # no UPDATE: deletions only at QUIT
            self.sessions -= 1
            self.per_ip[peer] -= 1
            if not self.per_ip[peer]:
                del self.per_ip[peer]
            writer.close()
            with contextlib.suppress(ConnectionError, OSError, ssl.SSLError):
                await writer.wait_closed()


async def serve(settings: Settings) -> None:
    tls = server_context(settings)
    if tls is None and settings.pop3s_listen:
        raise TLSConfigError("pop3s_listen needs a certificate (tlscert, or `shardmail gencert`)")
    directory = open_directory(settings)
    throttle = AuthThrottle(connect_shared(settings), settings.redis_prefix, settings)  # shared with SMTP AUTH
    authenticator = Authenticator(settings, directory, throttle)
    service = Pop3Service(settings, authenticator, directory, tls)
    listeners = [(spec, False) for spec in settings.pop3_listen] + [(spec, True) for spec in settings.pop3s_listen]
    servers = [await asyncio.start_server(functools.partial(service.handle, tls_now=implicit),
                                          sock=listening_socket(spec), limit=SASL_LIMIT,
                                          ssl=tls if implicit else None)
               for spec, implicit in listeners]
    log.info("POP3 on %s%s", ", ".join(f"{spec} ({'pop3s' if i else 'pop3'})" for spec, i in listeners),
             "" if tls is None else "; STLS offered")
    sdnotify.ready("POP3 on " + ", ".join(spec for spec, _ in listeners))
    await serve_until_stopped(servers)
    authenticator.close()


def main(settings: Settings) -> None:
    run_on_uvloop(serve(settings))
