"""QMQP, qmail's Quick Mail Queuing Protocol: the netstring codec and a client.

Interface: ``netstring(data) -> bytes``; ``pack(message, sender, recipients) -> bytes`` (one
request: an outer netstring holding the message's, the sender's and each recipient's; the message
with LF line ends, as the protocol has it); ``unpack(payload) -> Request``; ``read_netstring(reader,
limit)`` (asyncio: one netstring off a stream, the length field bounded) and ``length_field(data)``
(the same rules on the bytes received so far); ``Reply`` (``code`` K accepted, Z temporary, D
permanent, and its text) with ``encode()``, ``outcome()`` (as a ``Delivered``/``Deferred``/``Failed``)
and ``Reply.decode(raw)``;
``send(host, port, request, timeout) -> Reply`` (one request per connection, as qmail's qmqpc and
Postfix's qmqpd do); ``reply_complete(raw)`` (a client's reader has the whole reply).

Why netstrings (``<decimal length>:<bytes>,``): the receiver knows each part's size before it reads
it, so a message is never parsed for an end marker and a too-big one is refused from its length
field alone.

Failures: a malformed netstring or request raises ``ProtocolError`` (the server answers D or closes);
``send`` never raises for the peer's sake: a refused or reset connection, a timeout or a garbled
reply comes back as a ``Z`` reply (temporary: try another server or later), only the server's own
``D`` is permanent. Such a ``Z`` after the request went out is ``unsure`` (the server may have
queued it): a caller that must not make a second copy (ops.move) keeps its own until it knows. A
reply the server sent before it hung up on the rest of the request counts (``reply_complete``:
read up to the reply's end, not to EOF).

Settings: none (callers pass limits and timeouts).
"""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from core.outcome import Deferred, Delivered, Failed, Outcome

MAX_LENGTH_DIGITS = 10  # a length field longer than this is garbage, not a message
_STATUS = re.compile(r"#?([245]\.\d{1,3}\.\d{1,3})")


class ProtocolError(ValueError):
    """The bytes are not a QMQP request (or reply); the message says what is wrong."""


class TooLong(ProtocolError):
    """A netstring announces more than the receiver takes."""


def netstring(data: bytes) -> bytes:
    return b"%d:%s," % (len(data), data)


@dataclass(frozen=True, slots=True)
class Request:
    """One message as QMQP carries it: the body with LF line ends, sender ("" = null), recipients."""

    message: bytes
    sender: str
    recipients: list[str]


def pack(message: bytes, sender: str, recipients: Sequence[str]) -> bytes:
    """A whole request, ready for the wire; ``message`` may have CRLF or LF line ends."""
    inner = netstring(message.replace(b"\r\n", b"\n")) + netstring(sender.encode("utf-8", "surrogateescape"))
    inner += b"".join(netstring(r.encode("utf-8", "surrogateescape")) for r in recipients)
    return netstring(inner)


def _split(payload: bytes) -> list[bytes]:
    """The netstrings one after another in ``payload`` (which holds nothing else)."""
    parts: list[bytes] = []
    at = 0
    while at < len(payload):
        colon = payload.find(b":", at, at + MAX_LENGTH_DIGITS + 1)
        digits = payload[at:colon] if colon >= 0 else b""
        if not digits.isdigit() or (len(digits) > 1 and digits.startswith(b"0")):
            raise ProtocolError("malformed netstring length")
        end = colon + 1 + int(digits)
        if end >= len(payload) or payload[end:end + 1] != b",":
            raise ProtocolError("netstring without its comma")
        parts.append(payload[colon + 1:end])
        at = end + 1
    return parts


def unpack(payload: bytes) -> Request:
    """The request inside an outer netstring's payload."""
    parts = _split(payload)
    if len(parts) < 3:
        raise ProtocolError("a request needs a message, a sender and at least one recipient")
    message, sender, *recipients = parts
    try:
        return Request(message, sender.decode(), [r.decode() for r in recipients])
    except UnicodeDecodeError:
        raise ProtocolError("an address is not UTF-8") from None


def length_field(data: bytes | bytearray) -> tuple[int, int] | None:
    """(payload length, bytes of the length field and its colon) of the netstring ``data`` begins
    with; None while the field is still incomplete; ``ProtocolError`` as soon as the bytes so far
    cannot begin one (the rules of ``read_netstring``, for a server that reads as the data comes)."""
    for at in range(min(len(data), MAX_LENGTH_DIGITS + 1)):
        char = data[at]
        if char == 0x3A and at:  # ":" after at least one digit
            return int(data[:at]), at + 1
        if not 0x30 <= char <= 0x39 or at >= MAX_LENGTH_DIGITS or (at == 1 and data[0] == 0x30):
            raise ProtocolError("malformed netstring length")
    return None


async def read_netstring(reader: asyncio.StreamReader, limit: int) -> bytes:
    """One netstring's payload; ``TooLong`` from its length field alone when it exceeds ``limit``,
    ``ProtocolError`` for anything malformed, ``asyncio.IncompleteReadError`` at an early EOF."""
    digits = b""
    while True:
        char = await reader.readexactly(1)
        if char == b":":
            break
        if not char.isdigit() or len(digits) >= MAX_LENGTH_DIGITS or digits == b"0":
            raise ProtocolError("malformed netstring length")
        digits += char
    if not digits:
        raise ProtocolError("malformed netstring length")
    length = int(digits)
    if length > limit:
        raise TooLong(f"{length} bytes announced, {limit} taken")
    payload = await reader.readexactly(length)
    if await reader.readexactly(1) != b",":
        raise ProtocolError("netstring without its comma")
    return payload


Code = Literal["K", "Z", "D"]


@dataclass(frozen=True, slots=True)
class Reply:
    """``unsure``: a Z of our own making after the request went out (the connection broke, timed
    out or closed without a verdict, or the verdict was garbled): the server may have taken it."""

    code: Code
    text: str
    unsure: bool = field(default=False, compare=False)

    @property
    def accepted(self) -> bool:
        return self.code == "K"

    @property
    def permanent(self) -> bool:
        return self.code == "D"

    def encode(self) -> bytes:
        return netstring(self.code.encode() + self.text.encode("utf-8", "replace"))

    def outcome(self, where: str = "") -> Outcome:
        """The reply as a delivery outcome, its enhanced status code taken from the text when it
        carries one of its own class (qmail's "(#5.1.1)" style)."""
        default = {"K": "2.0.0", "Z": "4.3.0", "D": "5.0.0"}[self.code]
        found = _STATUS.search(self.text)
        status = found.group(1) if found and found.group(1)[0] == default[0] else default
        text = f"{self.text} ({where})" if where else self.text
        if self.code == "K":
            return Delivered(text, status)
        return Deferred(status, text) if self.code == "Z" else Failed(status, text)

    @classmethod
    def decode(cls, raw: bytes) -> Reply:
        """A reply netstring; anything that is not one is a temporary failure (we cannot know the
        server took the message, and it must not count as refused for good)."""
        try:
            (payload,) = _split(raw)
        except (ProtocolError, ValueError):
            return cls("Z", f"garbled QMQP reply {raw[:60]!r}", unsure=True)
        code, text = payload[:1].decode("ascii", "replace"), payload[1:].decode("utf-8", "replace")
        if code == "K":
            return cls("K", text)
        if code == "D":
            return cls("D", text)
        if code == "Z":
            return cls("Z", text)
        return cls("Z", f"unknown QMQP reply {payload[:60]!r}", unsure=True)


MAX_REPLY = 65536  # a reply is a code and a line of text; a peer sending more is not a QMQP server


def reply_complete(raw: bytes) -> bool:
    """Whether ``raw`` holds a whole reply netstring, or so much garbage that no more is worth reading.

    A client stops reading here rather than at EOF: a server that answers before it has read the
    whole request (Postfix's qmqpd refusing a client or an oversized message) closes with unread
    data, and the kernel then resets the connection, which would turn its answer into an error."""
    colon = raw.find(b":", 0, MAX_LENGTH_DIGITS + 1)
    if colon < 0:
        return len(raw) > MAX_LENGTH_DIGITS
    if not raw[:colon].isdigit():
        return True
    return len(raw) >= min(colon + int(raw[:colon]) + 2, MAX_REPLY)


def send(host: str, port: int, request: bytes, timeout: float) -> Reply:
    """Hand one packed request to a QMQP server and read its verdict; ``timeout`` bounds each
    connect, send and receive."""
    received = b""
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:  # nothing was sent: the server has certainly not taken it
        return Reply("Z", f"QMQP server {host}:{port}: {exc.strerror or exc} (#4.4.1)")
    try:
        with sock:
            try:
                sock.sendall(request)
                sock.shutdown(socket.SHUT_WR)
            except (BrokenPipeError, ConnectionResetError):
                pass  # it may have answered early and hung up: its reply is still to be read
            while not reply_complete(received) and (chunk := sock.recv(4096)):
                received += chunk
    except OSError as exc:
        if not reply_complete(received):
            return Reply("Z", f"QMQP server {host}:{port}: {exc.strerror or exc} (#4.4.2)", unsure=True)
    if not received:
        return Reply("Z", f"QMQP server {host}:{port} closed the connection without a reply (#4.4.2)", unsure=True)
    return Reply.decode(received)
