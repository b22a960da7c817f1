"""SMTP AUTH in the dialogue: the PLAIN and LOGIN mechanisms (RFC 4616, and the LOGIN draft every
client speaks), checked by core.auth without blocking the event loop.

Interface: ``AuthMechanisms``, a mixin for the SMTP server class (before aiosmtpd's ``SMTP`` in the
bases); ``authenticator`` (a ``core.auth.Authenticator``) is set per process by ingress.serve. With
none set, AUTH is not offered.

aiosmtpd decides where AUTH may be used: only over TLS (``538 5.7.11`` before STARTTLS), once per
session (``503``), and on the submission listeners before any mail (``530 5.7.0``). This mixin
decodes the credentials (``501 5.5.2`` for bad base64 or a malformed PLAIN message, ``501 5.7.0``
when the client cancels with ``*``), asks the authenticator, and answers with its verdict:
``235 2.7.0``, ``535 5.7.8`` (the same for an unknown user and a wrong password), ``454 4.7.0``
(directory or Redis trouble, or too many failures: then the session is also closed). On success the
session records the account (``session.auth_mail``) for the Received header and for relaying.

Failures: the authenticator's (all temporary, 454). Settings: through core.auth.
"""

from __future__ import annotations

import binascii
import logging
from base64 import b64decode
from typing import Any

from aiosmtpd.smtp import MISSING, AuthResult

from core.auth import Authenticator
from core.auth import AuthResult as Verdict
from ingress import replies

log = logging.getLogger("shardmail.smtpd")


class AuthMechanisms:
    authenticator: Authenticator | None = None

    async def auth_PLAIN(self, _: Any, args: list[str]) -> AuthResult:
        if len(args) == 1:
            blob = await self.challenge_auth("")  # type: ignore[attr-defined]
            if blob is MISSING:
                return AuthResult(success=False, handled=True)
        else:
            blob = await self._decode(args[1])
            if blob is None:
                return AuthResult(success=False, handled=True)
        parts = blob.split(b"\x00")
        if len(parts) != 3 or not parts[1]:
            await self.push(replies.AUTH_MALFORMED_PLAIN.line)  # type: ignore[attr-defined]
            return AuthResult(success=False, handled=True)
        return await self._check(parts[1], parts[2])

    async def auth_LOGIN(self, _: Any, args: list[str]) -> AuthResult:
        if len(args) == 1:
            login = await self.challenge_auth("Username:")  # type: ignore[attr-defined]
        else:
            login = await self._decode(args[1])
        if login is MISSING or login is None:
            return AuthResult(success=False, handled=True)
        password = await self.challenge_auth("Password:")  # type: ignore[attr-defined]
        if password is MISSING:
            return AuthResult(success=False, handled=True)
        return await self._check(login, password)

    async def _decode(self, text: str) -> bytes | None:
        try:
            return b64decode(text.encode(), validate=True)
        except (binascii.Error, ValueError):
            await self.push(replies.AUTH_BAD_BASE64.line)  # type: ignore[attr-defined]
            return None

    async def _check(self, login: bytes, password: bytes) -> AuthResult:
        session = self.session  # type: ignore[attr-defined]
        peer = session.peer[0] if isinstance(session.peer, tuple) else ""
        if self.authenticator is None:
            return AuthResult(success=False, handled=False, message=replies.AUTH_UNAVAILABLE.line)
        name = login.decode("utf-8", "replace")
        verdict = await self.authenticator.verify(name, password, peer)
        if verdict.ok:
            session.auth_mail = verdict.mail or name
            log.info("AUTH as %s from %s", session.auth_mail, peer)
            return AuthResult(success=True, message=replies.auth(verdict.result), auth_data=session.auth_mail)
        log.warning("AUTH failed for %r from %s: %s", name[:100], peer, verdict.reason)
        if verdict.result is Verdict.BLOCKED:
            await self.push(replies.auth(verdict.result))  # type: ignore[attr-defined]
            self.transport.close()  # type: ignore[attr-defined]
            return AuthResult(success=False, handled=True)
        return AuthResult(success=False, handled=False, message=replies.auth(verdict.result))
