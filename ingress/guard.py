"""Limits on SMTP sessions: how many, from whom, for how long, and how many mistakes.

Interface: ``ConnectionLimits(total, per_ip, exempt)`` with ``admit(ip) -> str | None`` (None, or
the 421 reply) and ``leave(ip)``; ``SessionGuard``, a mixin for the SMTP server class (before
aiosmtpd's ``SMTP`` in the bases) that applies them: a connection over a limit hears ``421 4.7.0``
instead of the greeting and is closed; a session that collects ``maxerrors`` refused commands
hears ``421 4.7.0`` and is closed; a session never lasts longer than ``timeoutconnection``;
``tarpit(session, settings)``, awaited before each refused RCPT's reply, delays it once the
session has had ``tarpitcount`` refusals (qmail's tarpitting: a dictionary attack slows to a crawl,
a client with one typo never notices).

The counts are per ingress process (as tcpserver's ``-c`` per instance; the kernel spreads one
client's connections over the SO_REUSEPORT processes, so a client meets about ``processes`` times
the per-process limit in all). Clients in ``relaynets`` are exempt from the per-address limit (a
submission host on the LAN is expected to open many).

Failures: none of its own. Settings: ``concurrencyincoming``, ``concurrencyperip``, ``maxerrors``,
``tarpitcount``, ``tarpitdelay``, ``timeoutconnection``, ``relaynets``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Awaitable
from typing import Any

from core.address import peer_in
from core.config import Settings
from ingress import replies

log = logging.getLogger("shardmail.smtpd")


class ConnectionLimits:
    def __init__(self, settings: Settings) -> None:
        self.total = settings.concurrencyincoming
        self.per_ip = settings.concurrencyperip
        self.me = settings.me
        self.exempt = [ipaddress.ip_network(n, strict=False) for n in settings.relaynets]
        self.open = 0
        self.by_ip: dict[str, int] = {}

    def admit(self, ip: str) -> str | None:
        if self.open >= self.total:
            return replies.TOO_MANY_CONNECTIONS.format(me=self.me, what="")
        count = self.by_ip.get(ip, 0)
        if count >= self.per_ip and not peer_in(ip, self.exempt):
            return replies.TOO_MANY_CONNECTIONS.format(me=self.me, what=" from your address")
        self.open += 1
        self.by_ip[ip] = count + 1
        return None

    def leave(self, ip: str) -> None:
        self.open -= 1
        left = self.by_ip.get(ip, 1) - 1
        if left > 0:
            self.by_ip[ip] = left
        else:
            self.by_ip.pop(ip, None)


class SessionGuard:
    """Mixin for the aiosmtpd server class (see the module docstring)."""

    limits: ConnectionLimits | None = None  # set per process by ingress.serve
    guard_settings: Settings | None = None
    _guard_ip: str | None = None  # set once counted in ``limits``
    _refusal: str | None = None
    _errors = 0
    _lifetime: asyncio.TimerHandle | None = None

    def connection_made(self, transport: Any) -> None:
        first = getattr(self, "_original_transport", None) is None and getattr(self, "transport", None) is None
        if first and self.limits is not None:
            peer = transport.get_extra_info("peername")
            ip = peer[0] if isinstance(peer, tuple) else ""
            self._refusal = self.limits.admit(ip)
            if self._refusal is None:
                self._guard_ip = ip
            else:
                log.warning("refused a connection from %s: %s", ip, self._refusal[4:])
        super().connection_made(transport)  # type: ignore[misc]
        if first and self._refusal is None and self.guard_settings is not None:
            self._lifetime = self.loop.call_later(  # type: ignore[attr-defined]
                self.guard_settings.timeoutconnection, self._too_long)

    def connection_lost(self, error: Exception | None) -> None:
        if self._guard_ip is not None and self.limits is not None:
            self.limits.leave(self._guard_ip)
            self._guard_ip = None
        if self._lifetime is not None:
            self._lifetime.cancel()
            self._lifetime = None
        super().connection_lost(error)  # type: ignore[misc]

    async def _handle_client(self) -> None:
        try:
            if self._refusal is not None:
                await self.push(self._refusal)
                self._close()
                return
            await super()._handle_client()  # type: ignore[misc]
        except asyncio.CancelledError:
            # the client hung up (aiosmtpd cancels this task on EOF); one that went away before
            # its greeting left the transport half open, so it was never counted out
            self._close()
            raise

    def eof_received(self) -> bool:
        """The client is gone: close our side too (buffered replies still go out first). aiosmtpd
        only cancels the session task, which leaves the connection half open - for ever, when the
        client left before that task first ran (as uvloop schedules it)."""
        super().eof_received()  # type: ignore[misc]
        self._close()
        return False

    def _close(self) -> None:
        transport = getattr(self, "transport", None)
        if transport is not None and not transport.is_closing():
            transport.close()

    def _too_long(self) -> None:
        me = self.guard_settings.me if self.guard_settings else ""
        transport = self.transport  # type: ignore[attr-defined]
        if transport is not None and not transport.is_closing():
            transport.write((replies.SESSION_TOO_LONG.format(me=me) + "\r\n").encode())
            self._close()

    def push(self, status: Any) -> Awaitable[None]:
        """The reply goes out as the server's push sends it (no extra coroutine on the common path);
        a refusal counts, and the one that reaches ``maxerrors`` is followed by 421 and a close."""
        settings = self.guard_settings
        sent = super().push(status)  # type: ignore[misc]
        if settings is None or self._refusal is not None or getattr(self, "_in_rcpt", False):
            return sent
        if status[:1] not in ("5", b"5"):
            return sent
        self._errors += 1
        if self._errors < settings.maxerrors:
            return sent
        self._refusal = replies.TOO_MANY_ERRORS.format(me=settings.me)
        return self._last_words(sent, self._refusal)

    async def _last_words(self, sent: Awaitable[None], farewell: str) -> None:
        await sent
        log.warning("closing a session from %s after %d errors", self._guard_ip, self._errors)
        await super().push(farewell)  # type: ignore[misc]
        self._close()

    async def smtp_STARTTLS(self, arg: str) -> None:
        """Once a session is encrypted, STARTTLS is an error (aiosmtpd would start a second TLS
        layer inside the first)."""
        if getattr(self, "_tls_protocol", None) is not None or self.transport.get_extra_info("sslcontext"):  # type: ignore[attr-defined]
            await self.push(replies.TLS_ACTIVE.line)
            return
        await super().smtp_STARTTLS(arg)  # type: ignore[misc]

    async def smtp_RCPT(self, arg: str | None) -> None:
        """RCPT refusals count for the tarpit, not as protocol errors."""
        self._in_rcpt = True
        try:
            await super().smtp_RCPT(arg)  # type: ignore[misc]
        finally:
            self._in_rcpt = False


async def tarpit(session: Any, settings: Settings) -> None:
    """Count a refused recipient; past ``tarpitcount`` in the session, wait before the reply."""
    refused = getattr(session, "refused_rcpts", 0) + 1
    session.refused_rcpts = refused
    if settings.tarpitcount and refused > settings.tarpitcount and settings.tarpitdelay:
        await asyncio.sleep(settings.tarpitdelay)
