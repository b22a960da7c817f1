"""The envelope of a queued message, its per-recipient state, message ids, and the on-disk codec.

Interface: ``Envelope``, ``Recipient``, ``Mark``, ``new_id(node)``, ``encode(envelope) -> bytes``,
``decode(line) -> Envelope``, ``encode_mark(mark) -> bytes``, ``decode_marks(blob) -> list[Mark]``;
``Envelope.sender_for(index)`` (the envelope sender a recipient's delivery uses: the VERP address
when ``verp`` holds delimiters, core.verp). The codec is versioned JSON (never pickle: a spool file
must not be able to run code, and ops tools in any language must be able to read it); a field
added later is written only when set and read with its default when absent, so entries written
before it (e.g. without ``verp``) decode as they always did.

Failures: ``EnvelopeError`` for anything that does not decode to a valid envelope; callers treat
such a spool entry as corrupt, never as a reason to stop.

Settings: none.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
import time
import zlib
from dataclasses import dataclass, field, replace
from typing import Literal

from core.verp import valid_delimiters, verp_sender

FORMAT_VERSION = 1
DOUBLE_BOUNCE_SENDER = "#@[]"  # qmail's envelope sender for double bounces: sent as <>, and never bounced
Channel = Literal["local", "remote"]
CHANNELS: tuple[Channel, ...] = ("local", "remote")
State = Literal["pending", "delivered", "deferred", "failed", "bounced"]
FINAL_STATES = frozenset({"delivered", "failed", "bounced"})  # no further delivery attempt
# bounced: failed, and its bounce is queued (or, for a failed double bounce, deliberately dropped)


class EnvelopeError(ValueError):
    """Bytes that are not a valid envelope or mark of a supported version."""


@dataclass(frozen=True, slots=True)
class Recipient:
    address: str
    channel: Channel


@dataclass(frozen=True, slots=True)
class Mark:
    """One recipient's outcome, appended to the spool entry after each attempt."""

    index: int
    state: State
    status: str = ""  # enhanced status code, e.g. 5.1.1
    text: str = ""
    at: float = 0.0


@dataclass(frozen=True, slots=True)
class Client:
    """Who handed us the message: for Received headers, logs and policy."""

    address: str = ""
    helo: str = ""
    protocol: str = "ESMTP"
    user: str = ""


@dataclass(frozen=True, slots=True)
class Envelope:
    id: str
    sender: str  # "" is the null sender <>
    recipients: tuple[Recipient, ...]
    birth: float
    shard: int = 0
    size: int = 0  # body bytes following the envelope line
    smtputf8: bool = False
    client: Client = field(default_factory=Client)
    marks: tuple[Mark, ...] = ()
    verp: str = ""  # "" = no VERP; else its two delimiters (core.verp), e.g. "+="

    def sender_for(self, index: int) -> str:
        """The envelope sender for recipient ``index``: ``sender``, or its VERP address."""
        if not self.verp:
            return self.sender
        return verp_sender(self.sender, self.recipients[index].address, self.verp)

    def states(self) -> list[Mark | None]:
        """The latest mark of each recipient (None = never attempted)."""
        latest: list[Mark | None] = [None] * len(self.recipients)
        for mark in self.marks:
            if 0 <= mark.index < len(latest):
                latest[mark.index] = mark
        return latest

    def pending(self, channel: Channel | None = None) -> list[int]:
        """Indexes of recipients not yet delivered or failed (optionally of one channel)."""
        return [
            i
            for i, mark in enumerate(self.states())
            if (mark is None or mark.state not in FINAL_STATES)
            and (channel is None or self.recipients[i].channel == channel)
        ]

    def unreported(self) -> list[int]:
        """Indexes of recipients that failed and have no bounce yet."""
        return [i for i, mark in enumerate(self.states()) if mark is not None and mark.state == "failed"]

    def done(self) -> bool:
        """Nothing left to do: every recipient delivered, or failed and bounced. Only then may the
        entry leave the spool (an accepted message is delivered, bounced, or still queued)."""
        return all(mark is not None and mark.state in ("delivered", "bounced") for mark in self.states())

    def channels(self) -> list[Channel]:
        """Channels that still have work, in a stable order."""
        wanted = {self.recipients[i].channel for i in self.pending()}
        return [c for c in CHANNELS if c in wanted]

    def with_marks(self, marks: list[Mark]) -> Envelope:
        return replace(self, marks=tuple(marks))


_lock = threading.Lock()
_last = [0, 0]  # (microseconds, counter) of the last id made in this process


def node_tag(me: str) -> int:
    """16 bits that tell nodes apart in message ids."""
    return zlib.crc32(me.encode()) & 0xFFFF


def new_id(node: int) -> str:
    """A time-ordered id unique across nodes, processes and threads.

    26 hex digits: microseconds since the epoch (14), node tag (4), pid (5), counter (3). Fixed
    width and upper case, so ids sort by arrival time as plain strings.
    """
    with _lock:
        micros = time.time_ns() // 1000
        if micros > _last[0]:
            _last[0], _last[1] = micros, 0
        else:  # same microsecond (or the clock stepped back): count on, carrying into the time
            _last[1] += 1
            if _last[1] > 0xFFF:
                _last[0], _last[1] = _last[0] + 1, 0
        micros, count = _last
    return f"{micros:014X}{node:04X}{os.getpid() & 0xFFFFF:05X}{count:03X}"


def id_time(message_id: str) -> float:
    """The arrival time encoded in an id (seconds since the epoch)."""
    return int(message_id[:14], 16) / 1e6


_ID = re.compile(r"[0-9A-F]{26}")


def valid_id(text: str) -> bool:
    return _ID.fullmatch(text) is not None


def encode(envelope: Envelope) -> bytes:
    """One line of JSON (no newline inside), terminated by LF; the body follows it on disk."""
    doc = {
        "v": FORMAT_VERSION,
        "id": envelope.id,
        "sender": envelope.sender,
        "rcpt": [[r.address, r.channel] for r in envelope.recipients],
        "birth": envelope.birth,
        "shard": envelope.shard,
        "size": envelope.size,
        "smtputf8": envelope.smtputf8,
        "client": [envelope.client.address, envelope.client.helo, envelope.client.protocol, envelope.client.user],
    }
    if envelope.verp:
        doc["verp"] = envelope.verp
    return json.dumps(doc, ensure_ascii=True, separators=(",", ":")).encode("ascii") + b"\n"


def decode(line: bytes) -> Envelope:
    try:
        doc = _DECODER.decode(line.decode("utf-8") if isinstance(line, bytes | bytearray) else line)
        if not isinstance(doc, dict):
            raise EnvelopeError("envelope is not a JSON object")
        if doc.get("v") != FORMAT_VERSION:
            raise EnvelopeError(f"unsupported envelope version {doc.get('v')!r}")
        recipients = tuple(Recipient(str(a), _channel(c)) for a, c in doc["rcpt"])
        if not recipients:
            raise EnvelopeError("envelope without recipients")
        address, helo, protocol, user = doc.get("client", ["", "", "ESMTP", ""])
        verp = doc.get("verp", "")
        if verp and not (isinstance(verp, str) and valid_delimiters(verp)):
            raise EnvelopeError(f"bad VERP delimiters {verp!r}")
        return Envelope(
            id=str(doc["id"]),
            sender=str(doc["sender"]),
            recipients=recipients,
            birth=float(doc["birth"]),
            shard=int(doc["shard"]),
            size=int(doc["size"]),
            smtputf8=bool(doc.get("smtputf8", False)),
            client=Client(str(address), str(helo), str(protocol), str(user)),
            verp=verp,
        )
    except EnvelopeError:
        raise
    except (ValueError, KeyError, TypeError, OverflowError, RecursionError) as exc:
        raise EnvelopeError(f"bad envelope: {exc}") from None


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not allowed")


_DECODER = json.JSONDecoder(parse_constant=_no_constant)  # one for all: json.loads with options makes one per call


def _channel(value: object) -> Channel:
    if value not in CHANNELS:
        raise EnvelopeError(f"unknown channel {value!r}")
    return value


_STATES = ("pending", "delivered", "deferred", "failed", "bounced")


def encode_mark(mark: Mark) -> bytes:
    doc = [mark.index, mark.state, mark.status, mark.text, round(mark.at, 3)]
    return json.dumps(doc, ensure_ascii=True, separators=(",", ":")).encode("ascii") + b"\n"


def decode_marks(blob: bytes) -> list[Mark]:
    """Every complete mark line; a torn last line (crash mid-append) or a garbled one is skipped."""
    marks = []
    for line in blob.split(b"\n"):
        if not line:
            continue
        try:
            index, state, status, text, at = _DECODER.decode(line.decode("utf-8"))
            if state not in _STATES or not math.isfinite(float(at)):
                continue
            marks.append(Mark(int(index), state, str(status), str(text), float(at)))
        except (ValueError, TypeError, OverflowError, RecursionError):
            continue
    return marks
