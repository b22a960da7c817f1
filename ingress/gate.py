"""What a client must pass, beyond the address checks of ingress.smtpd, before mail is accepted.

Interface: ``GatedHandler(settings, submitter, committer, directory)``, the aiosmtpd handler of every
listener: ingress.smtpd's ``Handler`` with the session-level policy added around its hooks.

- addresses: a trailing dot after the domain is dropped (``a@example.com.`` is ``a@example.com``);
- relaying: an authenticated client may relay, as a client in ``relaynets`` may;
- RCPT: an address with a route in its local part (percent hack, bang path, quoted ``@``) only from
  a client that may relay (``554 5.7.1``; we never interpret them, a host further on might);
  a refused recipient counts towards the tarpit (ingress.guard): past ``tarpitcount`` in a
  session, each refusal is answered only after ``tarpitdelay`` seconds.

Failures: as ingress.smtpd. Settings: ``tarpitcount``, ``tarpitdelay``, plus those of ingress.smtpd.
"""

from __future__ import annotations

from aiosmtpd.smtp import SMTP, Envelope, Session

from core.address import routes_elsewhere, without_root_dot
from ingress.guard import tarpit
from ingress.smtpd import Handler


class GatedHandler(Handler):
    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        return await super().handle_MAIL(server, session, envelope, without_root_dot(address), options)

    def may_relay(self, session: Session) -> bool:
        """An authenticated client may relay, like one in ``relaynets``."""
        return bool(session.authenticated) or super().may_relay(session)

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        address = without_root_dot(address)
        if routes_elsewhere(address) and not self.may_relay(session):
            status = "554 5.7.1 Sender-specified routing (%, !, quoted @) is not accepted"
        else:
            status = await super().handle_RCPT(server, session, envelope, address, options)
        if status.startswith("5"):
            await tarpit(session, self.settings)
        return status
