"""Every SMTP reply line shardmail writes itself: one table of code, enhanced code and text.

Interface: ``Reply(code, enhanced, text)`` with ``line`` (the finished line of a fixed reply, built
once) and ``format(**fields)`` (a reply with ``{fields}`` in its text); the named replies below;
``outcome(o, refusal=554)`` (an Outcome of core.outcome, which carries its own status and text, as
the line to send: 250, 451, or ``refusal`` — 550 at RCPT, 554 after DATA); ``auth(result)`` (the
reply to an AUTH verdict, core.auth's ``AuthResult``).

Why one table: a reader finds every word the server can say to a client in one place, checks each
against RFC 3463's enhanced codes once, and a reply's wording changes without a hunt through the
policy code. core/ modules return values (outcomes, verdicts, hits); only ingress turns them into
lines, from this table.

Failures: none. Settings: none (``me`` and the like are filled in by the caller).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from core.auth import AuthResult
from core.outcome import Deferred, Delivered, Outcome


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    enhanced: str
    text: str
    line: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "line", f"{self.code} {self.enhanced} {self.text}")

    def format(self, **fields: object) -> str:
        return self.line.format(**fields)


# MAIL, RCPT, DATA (ingress.smtpd)
SENDER_OK = Reply(250, "2.1.0", "Ok")
RECIPIENT_OK = Reply(250, "2.1.5", "Ok")
QUEUED = Reply(250, "2.0.0", "Ok: queued as {id}")
BAD_SENDER = Reply(501, "5.1.7", "Bad sender address syntax: {why}")
BAD_RECIPIENT = Reply(501, "5.1.3", "Bad recipient address syntax: {why}")
BAD_ADDRESS = Reply(501, "5.1.3", "Bad address syntax")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")
RELAY_DENIED = Reply(554, "5.7.1", "Relaying denied")
BARE_CR_LF = Reply(554, "5.5.2", "Message contains a bare CR or LF (RFC 5321 2.3.8); use CRLF line endings")
INTERNAL_ERROR = Reply(451, "4.3.0", "Internal error, try again later")
VERP_REFUSED = Reply(555, "5.5.4", "Unsupported option: XVERP")  # Postfix's words to a client not allowed it
VERP_BAD_DELIMITERS = Reply(501, "5.5.4", "Error: XVERP needs two characters from {allowed}")
VERP_NULL_SENDER = Reply(503, "5.5.4", "Error: XVERP requires non-null sender")
TRY_AGAIN = "{text}, try again later"  # a QueueUnavailable outcome's text, as the client reads it
# aiosmtpd's own replies, as ingress.smtpd rewrites them
MAIL_SYNTAX = Reply(501, "5.5.4", "Syntax: MAIL FROM:<address>")
RCPT_SYNTAX = Reply(501, "5.5.4", "Syntax: RCPT TO:<address>")
TOO_BIG = Reply(552, "5.3.4", "Message too big for system")
LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long (RFC 5321 4.5.3.1.6)")
NEED_RCPT = Reply(503, "5.5.1", "Error: need RCPT command")
DATA_SYNTAX = Reply(501, "5.5.4", "Syntax: DATA")
GO_AHEAD = "354 End data with <CR><LF>.<CR><LF>"  # no enhanced code on 354 (RFC 2034 3)

# policy (ingress.gate)
SENDER_REFUSED = Reply(553, "5.7.1", "Sender address refused by policy")
RECIPIENT_REFUSED = Reply(553, "5.7.1", "Recipient address refused by policy")
ROUTING_REFUSED = Reply(554, "5.7.1", "Sender-specified routing (%, !, quoted @) is not accepted")
LISTED = Reply(554, "5.7.1", "{reason}")  # a DNSBL's reason, already made printable (ingress.dnsbl)
RATE_ACCOUNT = Reply(451, "4.7.1", "Too many messages from this account, slow down and try again later")
RATE_ADDRESS = Reply(451, "4.7.1", "Too many messages from your address, slow down and try again later")
TEMPORARY = Reply(451, "4.3.0", "Temporary failure, try again later")

# connection and session limits (ingress.guard)
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "{me} Too many connections{what}, try again later")
TOO_MANY_ERRORS = Reply(421, "4.7.0", "{me} Too many errors, closing connection")
SESSION_TOO_LONG = Reply(421, "4.4.2", "{me} Session too long, closing connection")
TLS_ACTIVE = Reply(554, "5.5.1", "TLS already active")

# AUTH (ingress.smtp_auth, verdicts from core.auth)
AUTH_MALFORMED_PLAIN = Reply(501, "5.5.2", "Malformed PLAIN credentials")
AUTH_BAD_BASE64 = Reply(501, "5.5.2", "Cannot decode base64")
AUTH_UNAVAILABLE = Reply(454, "4.7.0", "Authentication not available")
_AUTH = {
    AuthResult.OK: Reply(235, "2.7.0", "Authentication successful"),
    AuthResult.BAD: Reply(535, "5.7.8", "Authentication credentials invalid"),
    AuthResult.TEMPORARY: Reply(454, "4.7.0", "Temporary authentication failure, try again later"),
    AuthResult.BLOCKED: Reply(454, "4.7.0", "Too many failed authentications, try again later"),
}


def outcome(result: Outcome, refusal: int = 554) -> str:
    if isinstance(result, Delivered):
        return f"250 {result.status} {result.text or 'Ok'}"
    return f"{451 if isinstance(result, Deferred) else refusal} {result.status} {result.text}"


def auth(result: AuthResult) -> str:
    return _AUTH[result].line
