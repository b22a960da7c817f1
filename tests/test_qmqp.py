"""The QMQP codec (pure): requests survive a round trip, malformed ones are named, replies map to
outcomes with their enhanced status codes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.outcome import Deferred, Delivered, Failed
from core.qmqp import ProtocolError, Reply, netstring, pack, unpack

ADDRESSES = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)


@given(st.binary(max_size=500).map(lambda b: b.replace(b"\r", b"")), ADDRESSES, st.lists(ADDRESSES, min_size=1,
                                                                                          max_size=5))
def test_a_request_survives_the_round_trip(message: bytes, sender: str, recipients: list[str]) -> None:
    wire = pack(message, sender, recipients)
    length, _, rest = wire.partition(b":")
    assert int(length) == len(rest) - 1 and rest.endswith(b",")
    request = unpack(rest[:-1])
    assert (request.message, request.sender, request.recipients) == (message, sender, recipients)


def test_crlf_goes_on_the_wire_as_lf() -> None:
    wire = pack(b"a\r\nb\r\n", "s@x", ["r@y"])
    assert unpack(wire.partition(b":")[2][:-1]).message == b"a\nb\n"


@pytest.mark.parametrize(("payload", "why"), [
    (b"3:abc", "comma"), (b"3:ab", "comma"), (b"a:", "length"), (b"01:a,", "length"),
    (netstring(b"m") + netstring(b"s"), "at least one recipient"), (netstring(b"m") + netstring(b"\xff") +
                                                                    netstring(b"r"), "UTF-8"),
])
def test_malformed_requests_are_named(payload: bytes, why: str) -> None:
    with pytest.raises(ProtocolError, match=why):
        unpack(payload)


def test_replies_become_outcomes_with_their_own_status() -> None:
    assert Reply.decode(b"5:Kok 1,").outcome() == Delivered("ok 1", "2.0.0")
    assert Reply.decode(b"25:Dno such user (#5.1.1) ok,").outcome() == Failed("5.1.1", "no such user (#5.1.1) ok")
    assert Reply.decode(b"18:Zdisk full (#5.1.1),").outcome().status == "4.3.0"  # never a 5 for a Z
    assert Reply.decode(b"garbage").code == "Z" and Reply.decode(b"4:Xwhy,").code == "Z"
    assert isinstance(Reply.decode(b"").outcome(), Deferred)
    assert Reply("K", "ok").encode() == b"3:Kok,"
