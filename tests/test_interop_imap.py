"""Interop: a real Dovecot (tests/dovecot.py) reads the Maildir that shardmail's local delivery wrote.

Shardmail stores LF lines; IMAP speaks CRLF. Dovecot serves each file with every LF turned into CRLF,
and its RFC822.SIZE (the "virtual" size) is the file size plus one byte per LF. Flags Dovecot sets
rename the file to ``cur/<name>:2,<flags>``, which shardmail's redelivery guard must still see.
"""

from __future__ import annotations

import imaplib
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from tests.conftest import Node, wait_until
from tests.test_local import make_rig
from workers.maildir import Maildir

if TYPE_CHECKING:  # imported as a plugin below, so that pytest rewrites its asserts
    from tests.dovecot import Dovecot


LONG_LINE = b"The quick brown fox jumps over the lazy dog, again and again and again.\r\n"
MESSAGES: dict[str, bytes] = {
    "small": b"Subject: small\r\n\r\nhi\r\n",
    "long": b"Subject: long\r\n\r\n" + b"".join(b"%06d " % i + LONG_LINE for i in range(4000)),
    "utf8": ("Subject: =?UTF-8?Q?Gr=C3=BC=C3=9Fe?=\r\nMIME-Version: 1.0\r\n"
             "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
             "Grüße aus Köln — 日本語のテキスト ✓\r\n").encode(),
    "dots": b"Subject: dots\r\n\r\nbefore\r\n.hidden line\r\n..two dots\r\n.\r\nafter\r\n",
    "folded": b"Subject: folded\r\nX-Long: one\r\n\ttwo\r\n  three\r\n\r\n\r\n \r\nblank lines above\r\n\r\n",
}
FETCH_META = re.compile(rb"UID (\d+) RFC822\.SIZE (\d+) BODY\[\] \{(\d+)\}")


def fetch_all(imap: imaplib.IMAP4, count: int) -> dict[int, tuple[int, bytes]]:
    """UID → (RFC822.SIZE, BODY[]) of messages 1..count, read without setting \\Seen."""
    found: dict[int, tuple[int, bytes]] = {}
    for seq in range(1, count + 1):
        typ, data = imap.fetch(str(seq), "(UID RFC822.SIZE BODY.PEEK[])")
        assert typ == "OK", data
        meta, body = data[0]
        match = FETCH_META.search(meta)
        assert match, meta
        assert int(match.group(3)) == len(body)
        found[int(match.group(1))] = (int(match.group(2)), body)
    return found


def test_dovecot_reads_what_local_delivery_wrote(node_factory: Callable[..., Node], tmp_path: Path,
                                                  dovecot_factory: Callable[[Mapping[str, Path]], Dovecot]) -> None:
    rig = make_rig(node_factory, tmp_path)
    envelopes = {key: rig.send(["alice@test.example"], body=body) for key, body in MESSAGES.items()}
    maildir = rig.store / "alice"
    names = {key: next(p.name for p in (maildir / "new").iterdir() if f".Q{env.id}R0." in p.name)
             for key, env in envelopes.items()}
    written = {key: (maildir / "new" / name).read_bytes() for key, name in names.items()}
    assert len(list((maildir / "new").iterdir())) == len(MESSAGES)
    assert all(b"\r" not in data for data in written.values())  # shardmail stores LF lines
    assert b"\n.hidden line\n..two dots\n.\nafter\n" in written["dots"]  # no dot-stuffing in the file
    assert "日本語".encode() in written["utf8"]

    dovecot = dovecot_factory({"alice": maildir})
    imap = dovecot.login("alice")
    typ, data = imap.select("INBOX")
    assert typ == "OK" and int(data[0]) == len(MESSAGES), (data, dovecot.log())

    by_crlf = {data.replace(b"\n", b"\r\n"): key for key, data in written.items()}
    uids: dict[str, int] = {}
    for uid, (size, body) in fetch_all(imap, len(MESSAGES)).items():
        assert body in by_crlf, f"UID {uid}: Dovecot served bytes no file holds: {body[:200]!r}"
        key = by_crlf[body]
        uids[key] = uid
        assert body.replace(b"\r\n", b"\n") == written[key]
        assert size == len(body) == len(written[key]) + written[key].count(b"\n"), key
    assert sorted(uids) == sorted(MESSAGES)

    # \Seen via IMAP: Dovecot renames the file to cur/<name>:2,S; shardmail must still find its copy
    typ, data = imap.uid("STORE", str(uids["utf8"]), "+FLAGS", "(\\Seen)")
    assert typ == "OK", data
    imap.logout()
    seen = maildir / "cur" / f"{names['utf8']}:2,S"
    wait_until(seen.exists, timeout=5)
    assert seen.read_bytes() == written["utf8"]
    assert not (maildir / "new" / names["utf8"]).exists()
    box = Maildir(maildir)
    for key, name in names.items():
        assert box.has(name), key
        assert box.deliver(name, written[key]) is False, key  # the redelivery guard: no second copy
    assert box.usage() == (sum(len(data) for data in written.values()), len(MESSAGES))

    # a fresh session sees the flag, on that message only
    imap = dovecot.login("alice")
    typ, data = imap.select("INBOX", readonly=True)
    assert typ == "OK" and int(data[0]) == len(MESSAGES)
    typ, data = imap.uid("SEARCH", "SEEN")
    assert typ == "OK" and data[0].split() == [str(uids["utf8"]).encode()], data
