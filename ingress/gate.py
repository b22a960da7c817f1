"""What a client must pass, beyond the address checks of ingress.smtpd, before mail is accepted.

Interface: ``GatedHandler(settings, submitter, committer, directory, limiter=None)``, the aiosmtpd
handler of every listener: ingress.smtpd's ``Handler`` with the session-level policy around its
hooks (``limiter``: a ``core.ratelimit.AsyncRateLimiter``, None when no rate limit is set).

- addresses: a trailing dot after the domain is dropped (``a@example.com.`` is ``a@example.com``);
- relaying: an authenticated client may relay, as may a client in ``relaynets``, and (a weak idea,
  since any client can claim any sender) one whose envelope sender is in ``relaymailfrom``;
- MAIL: over the message rate of the client address or of the authenticated user
  (``ratelimitip``, ``ratelimitsender`` per ``ratelimitwindow``, counted in Redis for all ingress
  processes): ``451 4.7.1``; Redis unreachable for the count: ``451 4.3.0``. The DNSBL lookups of
  the client address start here (every ``rbllist`` zone at once), for clients that may not relay;
- RCPT: a sender in ``badmailfrom``: ``553 5.7.1`` for every recipient (qmail's way: the client
  learns nothing from MAIL); a recipient in ``badrcptto``: ``553 5.7.1``; a client listed by a
  ``reject`` DNSBL: ``554 5.7.1`` with the list's reason; an address with a route in its local part
  (percent hack, bang path, quoted ``@``) only from a client that may relay (``554 5.7.1``: we
  never interpret them, a host further on might). A refused recipient counts towards the tarpit;
- DATA: a ``tag`` DNSBL listing adds ``X-RBL-Check: <zone> <reason>`` above the message.

Failures: a DNSBL outage counts as not listed (ingress.dnsbl); others as ingress.smtpd.
Settings: ``badmailfrom``, ``badrcptto``, ``relaymailfrom``, ``rbllist``, ``rbltimeout``,
``ratelimitip``, ``ratelimitsender``, ``ratelimitwindow``, ``tarpitcount``, ``tarpitdelay``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

import redis
from aiosmtpd.smtp import SMTP, Envelope, Session

from core.address import routes_elsewhere, without_root_dot
from core.config import Settings
from core.directory import Directory
from core.ratelimit import AsyncRateLimiter
from ingress import replies
from ingress.committer import IdSource, Intake
from ingress.dnsbl import Dnsbl, Hit
from ingress.guard import tarpit
from ingress.policy import Policy
from ingress.smtpd import Handler

log = logging.getLogger("shardmail.smtpd")


class GatedHandler(Handler):
    def __init__(self, settings: Settings, submitter: IdSource, committer: Intake, directory: Directory,
                 limiter: AsyncRateLimiter | None = None) -> None:
        super().__init__(settings, submitter, committer, directory)
        self.policy = Policy(settings)
        self.dnsbl = Dnsbl(settings)
        self.limiter = limiter

    def may_relay(self, session: Session) -> bool:
        if session.authenticated or super().may_relay(session):
            return True
        return self.policy.relay_sender(getattr(session, "mail_from", ""))

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        address = without_root_dot(address)
        if self.limiter is not None:
            refusal = await self._over_rate(session, self.limiter)
            if refusal:
                return refusal
        status = await super().handle_MAIL(server, session, envelope, address, options)
        if status.startswith("250"):
            session.mail_from = "" if address == "<>" else address  # type: ignore[attr-defined]  # ours
            if self.dnsbl and getattr(session, "rbl", None) is None and not super().may_relay(session) \
                    and not session.authenticated:
                peer = session.peer[0] if isinstance(session.peer, tuple) else ""
                session.rbl = asyncio.ensure_future(self.dnsbl.check(peer))  # type: ignore[attr-defined]  # ours
        return status

    async def _over_rate(self, session: Session, limiter: AsyncRateLimiter) -> str | None:
        peer = session.peer[0] if isinstance(session.peer, tuple) else ""
        user = getattr(session, "auth_mail", "") if session.authenticated else ""
        try:
            if user and not await limiter.allow("sender", user):
                log.warning("rate limit: %s (authenticated) is over %d messages per %d s", user,
                            self.settings.ratelimitsender, self.settings.ratelimitwindow)
                return replies.RATE_ACCOUNT.line
            if not user and not await limiter.allow("ip", peer):
                log.warning("rate limit: %s is over %d messages per %d s", peer, self.settings.ratelimitip,
                            self.settings.ratelimitwindow)
                return replies.RATE_ADDRESS.line
        except redis.RedisError as exc:
            log.warning("rate limit unavailable (%s): MAIL deferred", exc)
            return replies.TEMPORARY.line
        return None

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        address = without_root_dot(address)
        task = getattr(session, "rbl", None)
        status = self._refusal(session, address, await task if task is not None else ())
        if status is None:
            status = await super().handle_RCPT(server, session, envelope, address, options)
        if status.startswith("5"):
            await tarpit(session, self.settings)
        return status

    def _refusal(self, session: Session, address: str, listed: Iterable[Hit]) -> str | None:
        sender = getattr(session, "mail_from", "")
        if self.policy.bad_sender(sender):
            return replies.SENDER_REFUSED.line
        if self.policy.bad_recipient(address):
            return replies.RECIPIENT_REFUSED.line
        for hit in listed:
            if hit.action == "reject":
                return replies.LISTED.format(reason=hit.reason)
        if routes_elsewhere(address) and not self.may_relay(session):
            return replies.ROUTING_REFUSED.line
        return None

    def tags(self, session: Session) -> bytes:
        task = getattr(session, "rbl", None)
        if task is None or not task.done() or task.cancelled() or task.exception() is not None:
            return b""
        return b"".join(f"{hit.header()}\r\n".encode() for hit in task.result() if hit.action == "tag")
