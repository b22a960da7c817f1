"""The SMTP policy: what is accepted, what is refused, and every reply's words and codes.

Interface: ``Handler(settings, submitter, committer, directory)``, an aiosmtpd handler (its public
hook API only); the server class it runs in, and every use of aiosmtpd's internals, is
ingress.aiosmtpd_adapter's ``Server``; the words of every reply are ingress.replies'.

Policy, in the order a transaction meets it:
- MAIL: sender syntax (501 5.1.7), SIZE over ``databytes`` (552 5.3.4), 8-bit without SMTPUTF8;
  ``XVERP`` / ``XVERP=xy`` (VERP, core.verp, as Postfix takes it; offered in EHLO to relaynets and
  where AUTH is offered) only from a client in ``relaynets`` or authenticated, on a spooling node
  (555 5.5.4 otherwise), with two delimiters of ``-+=`` (501 5.5.4), not with ``<>`` (503 5.5.4).
- RCPT: syntax (501 5.1.3); more than ``maxrcptcount`` (452 4.5.3, the client sends the rest
  later); a domain outside ``rcpthosts``/``locals`` from a client outside ``relaynets`` (554 5.7.1);
  for ``locals``, the directory: unknown or deleted 550 5.1.1, disabled 550 5.2.1, directory down
  or slow 451 4.4.3 (never 5xx, never accept-then-bounce).
- DATA: only CRLF.CRLF ends it; a message holding a bare CR or LF is refused (554 5.5.2), so
  an SMTP-smuggling attempt never becomes a second message; over ``databytes`` 552 5.3.4; more
  than ``maxhops`` Received/Delivered-To lines with ours (core.hops) 554 5.4.6, a loop. A
  Received header is prepended, then the message goes through ``core.submit`` and only then
  ``250 2.0.0 Ok: queued as <id>``.

Failures: a spool or Redis fault, or any unexpected exception, is ``451 4.3.0`` (aiosmtpd's own
default would be a permanent 500): infrastructure trouble is never the client's fault.

Settings: ``me``, ``smtpgreeting``, ``rcpthosts``, ``locals``, ``relaynets``, ``databytes``,
``maxrcptcount``, ``maxhops``, ``timeoutsmtpd``, ``role``, ``verpdelimiters``.
"""

from __future__ import annotations

import asyncio
import email.utils
import ipaddress
import logging
import time
from dataclasses import replace

from aiosmtpd.smtp import SMTP, Envelope, Session

from core import faults, hops
from core.address import check_mailbox, clean_for_header, domain_matches, domain_of, peer_in
from core.config import Settings
from core.directory import Directory, account_verdict, lookup_outcome
from core.envelope import Client
from core.outcome import Deferred, Failed, QueueRefused, QueueUnavailable
from core.submit import Draft
from core.verp import ALLOWED, valid_delimiters
from ingress import replies
from ingress.committer import IdSource, Intake

log = logging.getLogger("shardmail.smtpd")

class Handler:
    """aiosmtpd hooks implementing shardmail's acceptance policy."""

    def __init__(self, settings: Settings, submitter: IdSource, committer: Intake, directory: Directory) -> None:
        self.settings = settings
        self.submitter = submitter
        self.committer = committer
        self.directory = directory
        self.locals = list(settings.locals)
        self.accepted = list(settings.rcpthosts) + self.locals
        self.relaynets = [ipaddress.ip_network(n, strict=False) for n in settings.relaynets]

    async def check_local(self, address: str) -> str | None:
        """The refusal for a local recipient the directory does not take, or None (RCPT time: never
        accept and bounce later). A lookup the cache can answer costs no thread hop."""
        verdict: Failed | Deferred | None
        known, user = self.directory.cached(address)
        if known:
            verdict = account_verdict(user)
        else:
            loop = asyncio.get_running_loop()
            _, verdict = await loop.run_in_executor(None, lookup_outcome, self.directory, address)
        if verdict is None:
            return None
        return replies.outcome(replace(verdict, text=f"<{clean_for_header(address)}>: {verdict.text}"), refusal=550)

    def may_relay(self, session: Session) -> bool:
        return peer_in(session.peer[0] if isinstance(session.peer, tuple) else "", self.relaynets)

    def may_verp(self, session: Session) -> bool:
        """XVERP only from a client allowed to relay by its address or its login (Postfix's
        authorized_verp_clients); an ingress-only node passes it on in qmail's spelling."""
        return session.authenticated or Handler.may_relay(self, session)

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        offer = Handler.may_relay(self, session) or any(r[4:].startswith("AUTH ") for r in responses)
        return _ehlo_lines(responses, ["XVERP"] if offer else [])

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        smtputf8 = any(o.upper() == "SMTPUTF8" for o in options)
        if address != "<>":  # aiosmtpd's spelling of the null sender; kept truthy for its state checks
            problem = check_mailbox(address, smtputf8)
            if problem:
                return replies.BAD_SENDER.format(why=problem)
        request = getattr(server, "verp_request", None)  # ingress.aiosmtpd_adapter took XVERP out
        if request is not None:
            if not self.may_verp(session):
                return replies.VERP_REFUSED.line
            if request and not valid_delimiters(request):
                return replies.VERP_BAD_DELIMITERS.format(allowed=ALLOWED)
            if address == "<>":
                return replies.VERP_NULL_SENDER.line
            envelope.verp = request or self.settings.verpdelimiters  # type: ignore[attr-defined]  # ours
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return replies.SENDER_OK.line

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        faults.check("smtpd.rcpt")
        smtputf8 = any(o.upper() == "SMTPUTF8" for o in envelope.mail_options)
        if len(envelope.rcpt_tos) >= self.settings.maxrcptcount:
            return replies.TOO_MANY_RECIPIENTS.line
        problem = check_mailbox(address, smtputf8)
        if problem:
            return replies.BAD_RECIPIENT.format(why=problem)
        domain = domain_of(address)
        if domain_matches(domain, self.locals):
            refusal = await self.check_local(address)
            if refusal:
                return refusal
        elif not domain_matches(domain, self.accepted) and not self.may_relay(session):
            return replies.RELAY_DENIED.line
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return replies.RECIPIENT_OK.line

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        if _has_bare_cr_or_lf(content):
            return replies.BARE_CR_LF.line
        if (loop := hops.check(content, self.settings.maxhops, added=1)) is not None:  # with our Received line
            return replies.outcome(loop)
        smtputf8 = any(o.upper() == "SMTPUTF8" for o in envelope.mail_options)
        submitter = self.submitter
        message_id = submitter.new_id()
        helo = clean_for_header(session.host_name or "unknown")
        peer = session.peer[0] if isinstance(session.peer, tuple) else "unknown"
        user = getattr(session, "auth_mail", "") if session.authenticated else ""
        protocol = _protocol(server, session, smtputf8, bool(user))
        body = self._received(message_id, helo, peer, protocol, envelope.rcpt_tos, user) + self.tags(session)
        body += content
        draft = Draft(message_id, _sender(envelope), list(envelope.rcpt_tos), body,
                      Client(address=peer, helo=helo, protocol=protocol, user=user), smtputf8,
                      verp=getattr(envelope, "verp", ""))
        try:
            await self.committer.commit(draft)
        except QueueUnavailable as exc:
            return replies.outcome(replace(exc.outcome, text=replies.TRY_AGAIN.format(text=exc.outcome.text)))
        except QueueRefused as exc:  # an ingress-only node's queue node said no for good
            return replies.outcome(exc.outcome)
        except Exception:
            log.exception("unexpected failure queueing %s", message_id)
            return replies.INTERNAL_ERROR.line
        log.info("queued %s from <%s> for %d rcpt, %d bytes", message_id, _sender(envelope),
                 len(envelope.rcpt_tos), len(body))
        return replies.QUEUED.format(id=message_id)

    def tags(self, session: Session) -> bytes:
        """Header lines the session adds above the message (ingress.gate's DNSBL tags)."""
        return b""

    def _received(self, message_id: str, helo: str, peer: str, protocol: str, rcpts: list[str],
                  user: str = "") -> bytes:
        me = self.settings.me
        who = f"\r\n\t(authenticated as {clean_for_header(user, 300)})" if user else ""
        line = f"Received: from {helo} ([{peer}]){who}\r\n\tby {me} (shardmail) with {protocol} id {message_id}"
        if len(rcpts) == 1:
            line += f"\r\n\tfor <{clean_for_header(rcpts[0], 300)}>"
        line += f"; {_now_rfc5322()}\r\n"
        return line.encode("utf-8", "surrogateescape")

    async def handle_exception(self, error: Exception) -> str:
        log.error("session error: %r", error, exc_info=error)
        return replies.INTERNAL_ERROR.line


_date_cache: tuple[int, str] = (0, "")


def _now_rfc5322() -> str:
    """The Received date, formatted once per second rather than once per message."""
    global _date_cache
    second = int(time.time())
    if _date_cache[0] != second:
        _date_cache = (second, email.utils.formatdate(second, localtime=True))
    return _date_cache[1]


def _protocol(server: SMTP, session: Session, smtputf8: bool, authenticated: bool) -> str:
    """The Received header's "with" word (RFC 3848): ESMTP, plus S over TLS and A when
    authenticated; UTF8SMTP likewise (RFC 6531); SMTP after HELO."""
    if not session.extended_smtp:
        return "SMTP"
    transport = server.transport
    tls = session.ssl is not None or (transport is not None and transport.get_extra_info("sslcontext") is not None)
    return ("UTF8SMTP" if smtputf8 else "ESMTP") + ("S" if tls else "") + ("A" if authenticated else "")


def _has_bare_cr_or_lf(data: bytes) -> bool:
    """Any CR or LF not part of a CRLF pair (three C-speed counts; a regex took 60 µs per 5 KB)."""
    pairs = data.count(b"\r\n")
    return data.count(b"\n") != pairs or data.count(b"\r") != pairs


def _sender(envelope: Envelope) -> str:
    return "" if envelope.mail_from in (None, "<>") else envelope.mail_from


def _ehlo_lines(responses: list[str], extra: list[str]) -> list[str]:
    """aiosmtpd's EHLO lines (greeting name, SIZE, 8BITMIME, SMTPUTF8, ...) plus ours."""
    keywords = [r[4:] for r in responses[1:] if r[4:] != "HELP"]
    keywords[:0] = ["PIPELINING"]
    keywords += extra
    keywords.append("ENHANCEDSTATUSCODES")
    lines = ["250-" + responses[0][4:]] + [f"250-{k}" for k in keywords[:-1]]
    return [*lines, f"250 {keywords[-1]}"]
