"""What a client must pass, beyond the address checks of ingress.smtpd, before mail is accepted.

Interface: ``GatedHandler(settings, submitter, committer, directory)``, the aiosmtpd handler of every
listener: ingress.smtpd's ``Handler`` with the session-level policy added around its hooks.

- RCPT: a refused recipient counts towards the tarpit (ingress.guard): past ``tarpitcount`` in a
  session, each refusal is answered only after ``tarpitdelay`` seconds.

Failures: as ingress.smtpd. Settings: ``tarpitcount``, ``tarpitdelay``, plus those of ingress.smtpd.
"""

from __future__ import annotations

from aiosmtpd.smtp import SMTP, Envelope, Session

from ingress.guard import tarpit
from ingress.smtpd import Handler


class GatedHandler(Handler):
    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        status = await super().handle_RCPT(server, session, envelope, address, options)
        if status.startswith("5"):
            await tarpit(session, self.settings)
        return status
