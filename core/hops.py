"""The hop count of a message: its ``Received:`` and ``Delivered-To:`` header lines (qmail's loop limit).

Interface: ``count(message) -> int`` (those lines in the header block only: up to the first empty
line, field names in any case, CRLF or LF line ends); ``check(message, maxhops, added=0) -> Failed |
None``: ``Failed("5.4.6", ...)`` when the message carries more than ``maxhops`` of them, counting
``added`` lines the caller is about to put on top (local delivery adds a ``Delivered-To``), else None.

A message that went round more than ``maxhops`` times is in a routing loop: ingress refuses it after
DATA (``check(data, settings.maxhops)`` before the commit: 554 5.4.6), and local delivery fails such
a recipient permanently (bounced) before any Maildir copy, forward or cluster hand-over. Cheap: one
scan of the header block per message, no copy.

Failures: none (a pure function). Settings: ``maxhops`` is the caller's to pass.
"""

from __future__ import annotations

import re

from core.outcome import Failed

_HOP = re.compile(rb"^(?:received|delivered-to)[ \t]*:", re.I | re.M)
_BLANK = re.compile(rb"\n\r?\n")


def header_end(message: bytes) -> int:
    """Offset just past the header block's last line end (0: no header lines at all)."""
    if message.startswith((b"\r\n", b"\n")):
        return 0
    blank = _BLANK.search(message)
    return len(message) if blank is None else blank.start() + 1


def count(message: bytes) -> int:
    """``Received:`` and ``Delivered-To:`` lines in the header block (continuation lines never count)."""
    return len(_HOP.findall(message, 0, header_end(message)))


def check(message: bytes, maxhops: int, added: int = 0) -> Failed | None:
    hops = count(message) + added
    if hops <= maxhops:
        return None
    return Failed("5.4.6", f"Too many hops ({hops} Received/Delivered-To lines, limit {maxhops}): routing loop")
