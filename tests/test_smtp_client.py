"""Pure parts of the outgoing SMTP client: the DATA payload, EHLO keywords, address forms."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from core.envelope import Envelope, Recipient
from workers.remote import needs_smtputf8, wire_address
from workers.smtp_client import _extensions, wire_data

BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")


def unstuff(payload: bytes) -> bytes:
    """What a receiving server reads back from a DATA payload (RFC 5321 4.5.2)."""
    assert payload.endswith(b"\r\n.\r\n") or payload == b".\r\n"
    lines = payload[:-3].split(b"\r\n")[:-1] if payload != b".\r\n" else []
    return b"".join((line[1:] if line.startswith(b".") else line) + b"\r\n" for line in lines)


@given(st.binary(max_size=300))
def test_payload_has_crlf_only_and_round_trips(body: bytes) -> None:
    payload = wire_data(body)
    assert not BARE.search(payload)
    assert all(not line.startswith(b".") or line == b"." or line.startswith(b"..")
               for line in payload.split(b"\r\n"))
    normalised = BARE.sub(b"\r\n", body)
    if normalised and not normalised.endswith(b"\r\n"):
        normalised += b"\r\n"
    assert unstuff(payload) == normalised


def test_payload_examples() -> None:
    assert wire_data(b"a\r\n.b\r\n") == b"a\r\n..b\r\n.\r\n"
    assert wire_data(b".x") == b"..x\r\n.\r\n"
    assert wire_data(b"a\nb\rc\r\n") == b"a\r\nb\r\nc\r\n.\r\n"
    assert wire_data(b"") == b".\r\n"


def test_ehlo_keywords() -> None:
    lines = ("mx.example greets you", "PIPELINING", "size 10240000", "8BITMIME", "STARTTLS", "AUTH PLAIN LOGIN")
    assert _extensions(lines) == {"PIPELINING": "", "SIZE": "10240000", "8BITMIME": "", "STARTTLS": "",
                                  "AUTH": "PLAIN LOGIN"}


def test_addresses_on_the_wire() -> None:
    assert wire_address("hans@bücher.test", utf8=False) == "hans@xn--bcher-kva.test"
    assert wire_address("hans@bücher.test", utf8=True) == "hans@bücher.test"
    assert wire_address("plain@example.com", utf8=False) == "plain@example.com"


def _envelope(sender: str, rcpt: str, smtputf8: bool) -> Envelope:
    return Envelope("0" * 26, sender, (Recipient(rcpt, "remote"),), 0.0, smtputf8=smtputf8)


def test_what_needs_smtputf8() -> None:
    ascii_body = b"Subject: hi\r\n\r\nGr\xc3\xbc\xc3\x9fe\r\n"  # 8-bit body only: 8BITMIME's business
    assert needs_smtputf8(_envelope("a@b.example", "j\u00fcrgen@x.test", False), ascii_body)
    assert not needs_smtputf8(_envelope("a@b.example", "hans@b\u00fccher.test", True), ascii_body)
    assert needs_smtputf8(_envelope("a@b.example", "hans@x.test", True), "Subject: Grüße\r\n\r\nx\r\n".encode())
    assert not needs_smtputf8(_envelope("a@b.example", "hans@x.test", False), "Subject: Grüße\r\n\r\n".encode())
