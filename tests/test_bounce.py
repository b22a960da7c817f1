"""Bounce composition (pure): RFC 3464 as Python's email package reads it, safe peer text, addressing."""

from __future__ import annotations

import email
import email.policy

from hypothesis import given
from hypothesis import strategies as st

from core.envelope import Envelope, Mark, Recipient
from scheduler.bounce import DOUBLE_BOUNCE_SENDER, addressing, compose, failure, safe_text

BODY = b"From: <a@example.net>\r\nTo: <x@far.example>\r\nSubject: hello\r\n\r\n" + b"line of text\r\n" * 50


def _envelope(sender: str = "a@example.net") -> Envelope:
    return Envelope("0660D62F5B1743082300F87000", sender,
                    (Recipient("x@far.example", "remote"), Recipient("y@far.example", "remote"),
                     Recipient("ok@far.example", "remote")), 1_700_000_000.0)


def _failures() -> list:
    return [failure("x@far.example", Mark(0, "failed", "5.1.1", "550 5.1.1 no such user (host mx.far.example"
                                                               "[192.0.2.7]:25 in reply to RCPT TO)")),
            failure("y@far.example", Mark(1, "failed", "4.4.1", "connect to mx.far.example[192.0.2.7]:25: timed "
                                                                "out (expired after the queue lifetime)"))]


def test_bounce_is_a_multipart_report_with_every_field() -> None:
    raw = compose(_envelope(), _failures(), BODY, "a@example.net", "mx.test.example", 100_000, "BOUNCEID")
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    assert message["To"].addresses[0].addr_spec == "a@example.net" and message["Auto-Submitted"] == "auto-replied"
    text, status, original = message.iter_parts()
    assert text.get_content_type() == "text/plain"
    assert "<x@far.example>" in text.get_content() and "<y@far.example>" in text.get_content()
    assert "ok@far.example" not in raw.decode()
    assert status.get_content_type() == "message/delivery-status"
    per_message, first, second = status.get_payload()
    assert per_message["Reporting-MTA"] == "dns; mx.test.example"
    assert first["Final-Recipient"] == "rfc822; x@far.example" and first["Action"] == "failed"
    assert first["Status"] == "5.1.1" and first["Remote-MTA"] == "dns; mx.far.example"
    assert first["Diagnostic-Code"].startswith("smtp; 550 5.1.1 no such user")
    assert second["Status"] == "5.0.0"  # a temporary code never stands in a failure report
    assert original.get_content_type() == "message/rfc822"
    assert original.get_payload()[0]["Subject"] == "hello"
    assert b"\r\n" in raw and b"\n" not in raw.replace(b"\r\n", b"")


def test_large_originals_are_cut_to_their_headers() -> None:
    raw = compose(_envelope(), _failures(), BODY, "a@example.net", "mx.test.example", 100, "BOUNCEID")
    part = list(email.message_from_bytes(raw, policy=email.policy.default).iter_parts())[2]
    assert part.get_content_type() == "text/rfc822-headers"
    assert b"line of text" not in raw


@given(st.text(max_size=300))
def test_a_peers_reply_cannot_inject_headers_or_parts(reply: str) -> None:
    evil = failure("x@far.example", Mark(0, "failed", "5.7.1", reply + "\r\nBcc: victim@example.org\r\n--b"))
    raw = compose(_envelope(), [evil], BODY, "a@example.net", "mx.test.example", 100_000, "B")
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert message["Bcc"] is None
    assert len(list(message.iter_parts())) == 3
    assert all(ch == "\n" or 32 <= ord(ch) < 127 for ch in safe_text(reply))
    assert "\n" not in safe_text(reply)


def test_who_gets_the_bounce() -> None:
    assert addressing(_envelope("a@example.net"), "postmaster") == ("", "a@example.net")
    assert addressing(_envelope(""), "postmaster") == (DOUBLE_BOUNCE_SENDER, "postmaster")
    assert addressing(_envelope(DOUBLE_BOUNCE_SENDER), "postmaster") is None
