"""core.envelope: the versioned JSON codec, marks, per-recipient state, message ids."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import threading
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.envelope import (
    CHANNELS,
    Client,
    Envelope,
    EnvelopeError,
    Mark,
    Recipient,
    decode,
    decode_marks,
    encode,
    encode_mark,
    id_time,
    new_id,
    node_tag,
    valid_id,
)

_ADDRESS = st.text(max_size=40)
_RECIPIENT = st.builds(Recipient, _ADDRESS, st.sampled_from(CHANNELS))
_ENVELOPE = st.builds(
    Envelope,
    id=st.text(alphabet="0123456789ABCDEF", min_size=26, max_size=26),
    sender=_ADDRESS,
    recipients=st.lists(_RECIPIENT, min_size=1, max_size=8).map(tuple),
    birth=st.floats(min_value=0, max_value=4e9, allow_nan=False),
    shard=st.integers(min_value=0, max_value=1023),
    size=st.integers(min_value=0, max_value=2**40),
    smtputf8=st.booleans(),
    client=st.builds(Client, st.text(max_size=20), st.text(max_size=20), st.text(max_size=8), st.text(max_size=8)),
)
_MARK = st.builds(
    Mark,
    index=st.integers(min_value=0, max_value=999),
    state=st.sampled_from(["pending", "delivered", "deferred", "failed"]),
    status=st.text(max_size=8),
    text=st.text(max_size=60),
    at=st.integers(min_value=0, max_value=4_000_000_000_000).map(lambda ms: ms / 1000),
)


def sample(**changes: object) -> Envelope:
    base = Envelope(
        id=new_id(1),
        sender="a@example.com",
        recipients=(Recipient("b@example.com", "remote"), Recipient("c@here.example", "local")),
        birth=1_700_000_000.5,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


@given(_ENVELOPE)
def test_encode_decode_round_trip(envelope: Envelope) -> None:
    line = encode(envelope)
    assert line.endswith(b"\n")
    assert b"\n" not in line[:-1]
    line.decode("ascii")
    assert decode(line.rstrip(b"\n")) == envelope


def test_decode_defaults_missing_optional_fields() -> None:
    doc = json.loads(encode(sample()))
    del doc["client"], doc["smtputf8"]
    decoded = decode(json.dumps(doc).encode())
    assert decoded.client == Client()
    assert decoded.smtputf8 is False


@pytest.mark.parametrize("version", [0, 2, "1", None])
def test_decode_rejects_other_versions(version: object) -> None:
    doc = json.loads(encode(sample()))
    doc["v"] = version
    with pytest.raises(EnvelopeError, match="version"):
        decode(json.dumps(doc).encode())


def test_decode_rejects_missing_recipients() -> None:
    doc = json.loads(encode(sample()))
    doc["rcpt"] = []
    with pytest.raises(EnvelopeError, match="recipients"):
        decode(json.dumps(doc).encode())
    del doc["rcpt"]
    with pytest.raises(EnvelopeError):
        decode(json.dumps(doc).encode())


def test_decode_rejects_unknown_channel() -> None:
    doc = json.loads(encode(sample()))
    doc["rcpt"] = [["x@example.com", "pigeon"]]
    with pytest.raises(EnvelopeError, match="channel"):
        decode(json.dumps(doc).encode())


_OK_DOC = b'{"v":1,"id":"X","sender":"","rcpt":[["a@b","local"]],"birth":0,"shard":0,"size":0'


@pytest.mark.parametrize(
    "garbage",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"not json", id="text"),
        pytest.param(b"\xff\xfe\x00garbage", id="binary"),
        pytest.param(b'{"v":1', id="torn"),
        pytest.param(_OK_DOC.replace(b'[["a@b","local"]]', b'"nope"') + b"}", id="rcpt-not-list"),
        pytest.param(_OK_DOC.replace(b'"birth":0', b'"birth":"soon"') + b"}", id="birth-not-number"),
        pytest.param(_OK_DOC + b',"client":null}', id="client-null"),
        # valid JSON that is not an object: a corrupt spool file can hold anything
        pytest.param(b"[]", id="json-list"),
        pytest.param(b"42", id="json-number"),
        pytest.param(b'"text"', id="json-string"),
        pytest.param(b"null", id="json-null"),
        # non-finite numbers and deep nesting are accepted or mishandled by Python's json module
        pytest.param(_OK_DOC.replace(b'"shard":0', b'"shard":Infinity') + b"}", id="infinite-shard"),
        pytest.param(b"[" * 100_000, id="deep-nesting"),
    ],
)
def test_decode_rejects_garbage_with_envelope_error(garbage: bytes) -> None:
    with pytest.raises(EnvelopeError):
        decode(garbage)


@given(st.binary(max_size=200) | st.recursive(st.none() | st.booleans() | st.integers() | st.text(),
                                              lambda c: st.lists(c) | st.dictionaries(st.text(), c))
       .map(lambda v: json.dumps(v).encode()))
def test_decode_raises_only_envelope_error(blob: bytes) -> None:
    with contextlib.suppress(EnvelopeError):
        decode(blob)


@given(st.lists(_MARK, max_size=10))
def test_marks_round_trip(marks: list[Mark]) -> None:
    blob = b"".join(encode_mark(m) for m in marks)
    assert decode_marks(blob) == marks


def test_decode_marks_skips_torn_and_garbled_lines() -> None:
    good = [Mark(0, "deferred", "4.4.1", "no answer", 1.0), Mark(1, "delivered", "2.0.0", "ok", 2.0)]
    blob = (
        encode_mark(good[0])
        + b"garbage line\n"
        + b'[0,"exploded","","",0]\n'
        + b"[1,2]\n"
        + b'{"index":0}\n'
        + b"\xff\xfe\n"
        + encode_mark(good[1])
        + encode_mark(Mark(0, "delivered", "2.0.0", "x", 3.0))[:-9]  # torn: crash mid-append
    )
    assert decode_marks(blob) == good


@pytest.mark.parametrize(
    "line",
    [
        pytest.param(b'[Infinity,"delivered","","",0]', id="infinite-index"),
        pytest.param(b'["x","delivered","","",0]', id="text-index"),
        pytest.param(b"[" * 100_000, id="deep-nesting"),
    ],
)
def test_decode_marks_skips_hostile_lines(line: bytes) -> None:
    good = Mark(0, "failed", "5.1.1", "no such user", 1.0)
    assert decode_marks(line + b"\n" + encode_mark(good)) == [good]


@given(st.binary(max_size=300))
def test_decode_marks_never_raises(blob: bytes) -> None:
    assert all(isinstance(m, Mark) for m in decode_marks(blob))


def test_pending_and_channels_follow_latest_mark() -> None:
    envelope = sample(recipients=(
        Recipient("r0@remote.example", "remote"),
        Recipient("l1@here.example", "local"),
        Recipient("r2@remote.example", "remote"),
    ))
    assert envelope.pending() == [0, 1, 2]
    assert envelope.channels() == ["local", "remote"]
    step = envelope.with_marks([Mark(1, "deferred"), Mark(0, "delivered"), Mark(2, "failed")])
    assert step.pending() == [1]
    assert step.pending("remote") == []
    assert step.channels() == ["local"]
    # a later mark wins over an earlier one, in file order
    later = step.with_marks([*step.marks, Mark(1, "delivered"), Mark(2, "deferred")])
    assert later.pending() == [2]
    assert later.channels() == ["remote"]
    assert later.states()[1] == Mark(1, "delivered")
    done = later.with_marks([*later.marks, Mark(2, "delivered")])
    assert done.pending() == []
    assert done.channels() == []


def test_marks_with_out_of_range_index_are_ignored() -> None:
    envelope = sample().with_marks([Mark(7, "delivered"), Mark(-1, "delivered")])
    assert envelope.pending() == [0, 1]


def test_new_id_is_26_hex_digits() -> None:
    message_id = new_id(node_tag("mx.example.com"))
    assert len(message_id) == 26
    assert valid_id(message_id)
    assert int(message_id, 16) >= 0
    assert not valid_id(message_id.lower())
    assert not valid_id(message_id[:-1])


def test_new_id_unique_across_threads() -> None:
    per_thread = 25_000
    results: list[list[str]] = [[] for _ in range(4)]
    barrier = threading.Barrier(4)

    def work(out: list[str]) -> None:
        barrier.wait()
        out.extend(new_id(7) for _ in range(per_thread))

    threads = [threading.Thread(target=work, args=(out,)) for out in results]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    every = [i for out in results for i in out]
    assert len(every) == 100_000
    assert len(set(every)) == 100_000


def test_new_id_sorts_in_creation_order() -> None:
    ids = [new_id(3) for _ in range(20_000)]
    assert sorted(ids) == ids


def test_id_time_is_close_to_now() -> None:
    before = time.time()
    message_id = new_id(0)
    after = time.time()
    assert before - 0.001 <= id_time(message_id) <= after + 0.001


def test_node_tag_is_16_bits_and_stable() -> None:
    assert node_tag("mx.example.com") == node_tag("mx.example.com")
    assert 0 <= node_tag("mx.example.com") <= 0xFFFF
    assert new_id(node_tag("a"))[14:18] == f"{node_tag('a'):04X}"
