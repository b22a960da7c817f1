"""Bounce messages: RFC 3464 delivery status notifications for recipients that failed for good.

Interface: ``Failure`` (one failed recipient), ``failure(address, mark) -> Failure``,
``addressing(envelope, doublebounceto) -> (sender, recipient) | None``,
``bounces(envelope, failed, doublebounceto) -> [(sender, recipient, indexes)] | None``,
``compose(envelope, failures, body, recipient, me, max_bytes, message_id) -> bytes``; ``DOUBLE_BOUNCE_SENDER``.

One bounce per message per round, listing every recipient that failed in it: a
``multipart/report; report-type=delivery-status`` with a plain-text part a person can read, a
``message/delivery-status`` part (Reporting-MTA, Arrival-Date, then per recipient Final-Recipient,
Action, Status, Remote-MTA where known, Diagnostic-Code) and the original message, or only its
headers (``text/rfc822-headers``) when it is larger than ``max_bytes``.

Who gets it (qmail's rules): the envelope sender, from the null sender ``<>``; a message from
``<>`` (a bounce that bounced) goes to ``doublebounceto`` from ``DOUBLE_BOUNCE_SENDER``
(qmail's ``#@[]``, sent as ``<>`` on the wire); a message from that sender failing is discarded
(logged by the caller), so bounces never loop. A message with VERP (core.verp) gets one bounce per
failed recipient, each to that recipient's VERP address, so the list learns who failed even from
a bounce it cannot parse.

A peer's words reach the bounce only as printable ASCII on one line (no CR, LF or other control
character, at most ``TEXT_LIMIT`` characters), so a reply can never start a header, a MIME part
or a line of its own.

Failures: none (pure). Settings: none directly (``me``, ``doublebounceto``, ``bouncemaxbytes`` are
passed in).
"""

from __future__ import annotations

import email.utils
import re
from dataclasses import dataclass

from core.envelope import DOUBLE_BOUNCE_SENDER, Envelope, Mark

__all__ = ["DOUBLE_BOUNCE_SENDER", "Failure", "addressing", "bounces", "compose", "failure", "safe_text"]
TEXT_LIMIT = 900
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")
_REMOTE = re.compile(r"\bhost ([^\s\[\]]+)\[([^\]\s]*)\]")


@dataclass(frozen=True, slots=True)
class Failure:
    address: str
    status: str  # 5.x.x
    text: str  # the reason, as recorded in the mark
    remote: str = ""  # the peer's name, when a peer said it


def safe_text(text: str, limit: int = TEXT_LIMIT) -> str:
    """One line of printable ASCII."""
    return " ".join(_UNPRINTABLE.sub(" ", text).split())[:limit]


def failure(address: str, mark: Mark) -> Failure:
    status = mark.status if re.fullmatch(r"5\.\d{1,3}\.\d{1,3}", mark.status or "") else "5.0.0"
    remote = _REMOTE.search(mark.text or "")
    return Failure(address, status, mark.text, remote.group(1) if remote else "")


def addressing(envelope: Envelope, doublebounceto: str) -> tuple[str, str] | None:
    """(envelope sender, recipient) of the bounce for this message, or None: discard it."""
    if envelope.sender == DOUBLE_BOUNCE_SENDER:
        return None
    if envelope.sender == "":
        return DOUBLE_BOUNCE_SENDER, doublebounceto
    return "", envelope.sender


def bounces(envelope: Envelope, failed: list[int], doublebounceto: str) -> list[tuple[str, str, list[int]]] | None:
    """(envelope sender, recipient, indexes of the failed recipients it reports) of each bounce, or
    None: discard them. One bounce for all, as ``addressing`` says; with VERP one per failed
    recipient, to that recipient's VERP address (what a list manager such as ezmlm expects)."""
    target = addressing(envelope, doublebounceto)
    if target is None:
        return None
    if not envelope.verp or target[0]:  # target[0] set: a bounce's bounce, never per recipient
        return [(target[0], target[1], failed)]
    return [("", envelope.sender_for(i), [i]) for i in failed]


def _header_block(body: bytes) -> bytes:
    end = body.find(b"\r\n\r\n")
    return body if end < 0 else body[: end + 2]


def compose(envelope: Envelope, failures: list[Failure], body: bytes, recipient: str, me: str, max_bytes: int,
            message_id: str) -> bytes:
    """The bounce to ``recipient``, as CRLF bytes ready for the front door."""
    boundary = f"{message_id}/{safe_text(me, 200)}"
    sender = safe_text(envelope.sender, 300) or "<>"
    lines = [
        f"From: MAILER-DAEMON@{me} (Mail Delivery System)",
        f"To: <{safe_text(recipient, 300)}>",
        "Subject: Undelivered mail returned to sender",
        f"Date: {email.utils.formatdate(localtime=True)}",
        f"Message-ID: <{message_id}@{me}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        "",
        "This is a MIME-encapsulated message.",
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=us-ascii",
        "Content-Description: Notification",
        "",
        f"This is the mail system at {me}.",
        "",
        f"Your message from {sender} could not be delivered to "
        + ("this recipient:" if len(failures) == 1 else f"these {len(failures)} recipients:"),
        "",
    ]
    for item in failures:
        lines += [f"<{safe_text(item.address, 300)}>:", f"    {safe_text(item.text)}", ""]
    lines += [
        f"--{boundary}",
        "Content-Type: message/delivery-status",
        "Content-Description: Delivery report",
        "",
        f"Reporting-MTA: dns; {safe_text(me, 200)}",
        f"X-Shardmail-Queue-ID: {envelope.id}",
        f"Arrival-Date: {email.utils.formatdate(envelope.birth, localtime=True)}",
        "",
    ]
    for item in failures:
        lines += [f"Final-Recipient: rfc822; {safe_text(item.address, 300)}", "Action: failed",
                  f"Status: {item.status}"]
        if item.remote:
            lines.append(f"Remote-MTA: dns; {safe_text(item.remote, 255)}")
        kind = "smtp" if item.remote else "x-shardmail"
        lines += [f"Diagnostic-Code: {kind}; {safe_text(item.text)}", ""]
    whole = len(body) <= max_bytes
    lines += [f"--{boundary}",
              "Content-Type: message/rfc822" if whole else "Content-Type: text/rfc822-headers",
              "Content-Description: " + ("Undelivered message" if whole else "Undelivered message headers"),
              ""]
    original = body if whole else _header_block(body)
    if original and not original.endswith(b"\r\n"):
        original += b"\r\n"
    return ("\r\n".join(lines) + "\r\n").encode("ascii") + original + f"\r\n--{boundary}--\r\n".encode("ascii")
