"""Delivery outcomes as values, and their mapping from peers' replies and to exit codes.

Interface: ``Delivered``, ``Deferred``, ``Failed`` (frozen dataclasses; ``Outcome`` is their union),
``from_reply(code, text) -> Outcome`` (a peer's reply; the reverse, an outcome as the reply
shardmail's smtpd sends, is ingress.replies' ``outcome``),
``exit_code(outcome) -> int``, ``QueueUnavailable`` (raised by the
front door when a message cannot be made durable or enqueued).

Outcomes are values, never exceptions: rq treats an exception as a bug in the job, and a mail
system must tell "try later" from "never" in exactly one place. Every infrastructure fault is a
``Deferred``; only a definite answer from the authority (5xx, NXDOMAIN, no such user) is ``Failed``.

Failures: none. Settings: none.
"""

from __future__ import annotations

from dataclasses import dataclass

# sysexits.h, as sendmail-compatible commands report them
EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_NOUSER = 67
EX_IOERR = 74
EX_TEMPFAIL = 75
EX_CONFIG = 78


@dataclass(frozen=True, slots=True)
class Delivered:
    text: str = ""
    status: str = "2.0.0"


@dataclass(frozen=True, slots=True)
class Deferred:
    status: str  # 4.x.x
    text: str


@dataclass(frozen=True, slots=True)
class Failed:
    status: str  # 5.x.x
    text: str


Outcome = Delivered | Deferred | Failed


def from_reply(code: int, text: str) -> Outcome:
    """A peer's SMTP reply as an outcome: 2xx delivered, 4xx (and anything odd) deferred, 5xx failed.
    The enhanced code is taken from the text when the peer gave one."""
    words = text.split(None, 1)
    enhanced = words[0] if words and _looks_enhanced(words[0]) else ""
    detail = f"{code} {text}".strip()
    if 200 <= code < 300:
        return Delivered(detail, enhanced or "2.0.0")
    if 500 <= code < 600:
        return Failed(enhanced if enhanced.startswith("5") else "5.0.0", detail)
    return Deferred(enhanced if enhanced.startswith("4") else "4.0.0", detail)


def _looks_enhanced(word: str) -> bool:
    parts = word.split(".")
    return len(parts) == 3 and all(p.isdigit() for p in parts) and parts[0] in ("2", "4", "5")


def exit_code(outcome: Outcome) -> int:
    """Exit status of a sendmail-compatible command for an outcome."""
    if isinstance(outcome, Delivered):
        return EX_OK
    if isinstance(outcome, Deferred):
        return EX_TEMPFAIL
    return EX_NOUSER if outcome.status.startswith("5.1.") else EX_DATAERR


class QueueUnavailable(Exception):
    """The message could not be made durable and enqueued; nothing of it was kept."""

    def __init__(self, outcome: Deferred) -> None:
        super().__init__(outcome.text)
        self.outcome = outcome


class QueueRefused(Exception):
    """The queue node an ingress-only node handed the message to refused it for good (QMQP D)."""

    def __init__(self, outcome: Failed) -> None:
        super().__init__(outcome.text)
        self.outcome = outcome
