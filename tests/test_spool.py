"""core.spool: durable write/read/mark/remove, scanning past corrupt entries, leftovers, and real crashes."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from core.envelope import Envelope, Mark, Recipient, encode_mark, new_id
from core.spool import FREE_SLOTS, LEFTOVER_AGE, RECYCLE_MAX, Recycled, Spool

REPO = Path(__file__).resolve().parents[1]
BODY = b"Subject: test\r\n\r\n" + b"".join(b"line %d of the body\r\n" % i for i in range(200))


def make(body: bytes = BODY, recipients: int = 2) -> Envelope:
    return Envelope(
        id=new_id(1),
        sender="sender@example.com",
        recipients=tuple(Recipient(f"r{i}@example.net", "remote") for i in range(recipients)),
        birth=time.time(),
        size=len(body),
    )


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "spool", 0, split=5)


def files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file())


def test_write_read_body_round_trip(spool: Spool) -> None:
    envelope = make()
    path = spool.write(envelope, BODY)
    assert path == spool.path(envelope.id)
    assert path.parent.parent == spool.queue
    assert spool.read(envelope.id) == envelope
    assert spool.body(envelope.id) == BODY
    assert list(spool.ids()) == [envelope.id]
    assert spool.count() == 1
    assert files(spool.tmp) == []


@pytest.mark.parametrize("body", [b"", b"no trailing newline", os.urandom(200_000)], ids=["empty", "bare", "large"])
def test_round_trip_of_unusual_bodies(spool: Spool, body: bytes) -> None:
    envelope = make(body)
    spool.write(envelope, body)
    assert spool.body(envelope.id) == body
    spool.mark(envelope.id, [Mark(0, "delivered", "2.0.0", "ok", 1.0)])
    assert spool.body(envelope.id) == body
    assert spool.read(envelope.id).marks == (Mark(0, "delivered", "2.0.0", "ok", 1.0),)


def test_mark_is_in_the_file_and_read_back(tmp_path: Path, spool: Spool) -> None:
    envelope = make()
    spool.write(envelope, BODY)
    first = Mark(0, "deferred", "4.4.1", "connection refused", 1_700_000_000.25)
    second = Mark(1, "delivered", "2.0.0", "250 ok", 1_700_000_001.5)
    spool.mark(envelope.id, [first])
    spool.mark(envelope.id, [second])
    data = spool.path(envelope.id).read_bytes()
    assert data.endswith(BODY + encode_mark(first) + encode_mark(second))
    reopened = Spool(tmp_path / "spool", 0, split=5)
    again = reopened.read(envelope.id)
    assert again.marks == (first, second)
    assert again.pending() == [0]
    assert reopened.body(envelope.id) == BODY


def test_marks_of_several_entries_in_one_group_commit(spool: Spool) -> None:
    envelopes = [make() for _ in range(3)]
    for envelope in envelopes:
        spool.write(envelope, BODY)
    gone = make()
    items = [(e.id, [Mark(0, "delivered", "2.0.0", f"250 ok {i}", 1_700_000_000.0)]) for i, e in enumerate(envelopes)]
    results = spool.mark_many([*items[:2], (gone.id, items[0][1]), items[2]])
    assert results[:2] == [None, None] and results[3] is None
    assert isinstance(results[2], FileNotFoundError)  # only the missing entry fails
    assert [spool.read(e.id).marks[0].text for e in envelopes] == ["250 ok 0", "250 ok 1", "250 ok 2"]
    assert spool.mark_many([items[0]]) == [None]  # a single entry: an fdatasync of its own
    assert len(spool.read(envelopes[0].id).marks) == 2


def test_torn_mark_does_not_swallow_the_next(spool: Spool) -> None:
    envelope = make()
    spool.write(envelope, BODY)
    before = Mark(0, "deferred", "4.4.1", "later", 1.0)
    spool.mark(envelope.id, [before])
    with open(spool.path(envelope.id), "ab") as handle:
        handle.write(b'[1,"delivered","2.0.0","to')  # a crash in the middle of an append
    after = Mark(1, "failed", "5.1.1", "no such user", 2.0)
    spool.mark(envelope.id, [after])
    assert spool.read(envelope.id).marks == (before, after)
    assert spool.body(envelope.id) == BODY


def test_torn_mark_right_after_a_body_without_newline(spool: Spool) -> None:
    body = b"ends without newline"
    envelope = make(body)
    spool.write(envelope, body)
    with open(spool.path(envelope.id), "ab") as handle:
        handle.write(b"\x00\x17garbled")
    mark = Mark(0, "delivered", "2.0.0", "", 3.0)
    spool.mark(envelope.id, [mark])
    assert spool.read(envelope.id).marks == (mark,)
    assert spool.body(envelope.id) == body


def test_remove(spool: Spool) -> None:
    envelope = make()
    spool.write(envelope, BODY)
    spool.remove(envelope.id)
    assert not spool.path(envelope.id).exists()
    assert spool.count() == 0
    spool.remove(envelope.id)  # already gone: quiet (a lost unlink is replayed by the sweep)


def test_removed_files_are_recycled_by_later_writes(spool: Spool) -> None:
    """A spent file goes to free/ and the next write reuses its inode (no create, no delete), cut
    to the new message's length: nothing of the old message survives."""
    old = make(BODY * 3)
    spool.write(old, BODY * 3)
    inode = spool.path(old.id).stat().st_ino
    spool.remove(old.id, old.size)
    assert not spool.path(old.id).exists() and spool.count() == 0
    assert [p.stat().st_ino for p in spool.free.iterdir()] == [inode]
    new = make(b"short")
    spool._free_listed = 0.0  # the empty listing of a moment ago is not waited out
    path = spool.write(new, b"short")
    assert path.stat().st_ino == inode
    assert list(spool.free.iterdir()) == [] and files(spool.tmp) == []
    assert spool.read(new.id) == new and spool.body(new.id) == b"short"
    assert BODY not in path.read_bytes()


def test_large_files_are_deleted_and_the_free_pool_is_bounded(spool: Spool) -> None:
    big = make(b"x" * (RECYCLE_MAX + 1))
    spool.write(big, b"x" * (RECYCLE_MAX + 1))
    spool.remove(big.id)  # no size given: the file's own
    assert list(spool.free.iterdir()) == [] and spool.count() == 0
    for _ in range(FREE_SLOTS + 5):
        envelope = make()
        spool.write(envelope, BODY)
        spool.remove(envelope.id, envelope.size)
    assert len(list(spool.free.iterdir())) <= FREE_SLOTS


def test_a_free_file_taken_by_another_writer_is_skipped(spool: Spool) -> None:
    spool._free_names = ["0001", "0002"]  # listed a moment ago; another process has taken both since
    envelope = make()
    spool.write(envelope, BODY)
    assert spool.body(envelope.id) == BODY and spool._free_names == []


def test_a_name_leading_to_another_message_is_no_entry_for_readers(spool: Spool) -> None:
    """A reader that opened an entry as it was recycled, or a stale second name after a crash:
    the id inside decides; the scan reports a stale name that stays."""
    envelope = make()
    spool.write(envelope, BODY)
    stale = make()
    os.link(spool.path(envelope.id), spool.path(stale.id))
    with pytest.raises(Recycled):
        spool.load(stale.id)
    with pytest.raises(FileNotFoundError):
        spool.read(stale.id)
    found = {entry.id: entry.error for entry in spool.scan()}
    assert found[envelope.id] == "" and "holds" in found[stale.id]


def test_withdraw(spool: Spool) -> None:
    envelope = make()
    spool.write(envelope, BODY)
    spool.withdraw([envelope.id])
    with pytest.raises(FileNotFoundError):
        spool.read(envelope.id)
    assert list(spool.scan()) == []
    assert spool.withdraw([envelope.id]) == []  # already gone: nothing left committed


@pytest.mark.parametrize(
    "garbage",
    [
        pytest.param(os.urandom(64).replace(b"\n", b"") + b"\n" + os.urandom(64), id="binary"),
        pytest.param(b"no newline at all", id="no-envelope-line"),
        pytest.param(b'{"v":9}\nbody', id="future-version"),
        pytest.param(b"[]\nbody", id="json-list"),
    ],
)
def test_scan_yields_corrupt_entry_and_keeps_going(spool: Spool, garbage: bytes) -> None:
    good = [make() for _ in range(3)]
    for envelope in good:
        spool.write(envelope, BODY)
    bad_id = new_id(1)
    spool.path(bad_id).write_bytes(garbage)
    entries = {entry.id: entry for entry in spool.scan()}
    assert set(entries) == {e.id for e in good} | {bad_id}
    assert entries[bad_id].envelope is None
    assert entries[bad_id].error
    assert entries[bad_id].path == spool.path(bad_id)
    for envelope in good:
        assert entries[envelope.id].envelope == envelope
        assert entries[envelope.id].error == ""


def test_scan_flags_truncated_body_and_foreign_id(spool: Spool) -> None:
    truncated, foreign = make(), make()
    spool.write(truncated, BODY)
    path = spool.path(truncated.id)
    path.write_bytes(path.read_bytes()[:-10])
    spool.write(foreign, BODY)
    renamed_id = new_id(1)
    spool.path(foreign.id).rename(spool.path(renamed_id))
    errors = {entry.id: entry.error for entry in spool.scan()}
    assert "truncated" in errors[truncated.id]
    assert foreign.id in errors[renamed_id]


def test_quarantine_moves_entry_to_corrupt(spool: Spool) -> None:
    bad_id = new_id(1)
    spool.path(bad_id).write_bytes(b"garbage")
    target = spool.quarantine(bad_id)
    assert target == spool.corrupt / bad_id
    assert target.read_bytes() == b"garbage"
    assert not spool.path(bad_id).exists()
    assert list(spool.scan()) == []


def test_leftovers_report_age_and_committed_flag(spool: Spool) -> None:
    committed = make()
    spool.write(committed, BODY)
    (spool.tmp / committed.id).write_bytes(b"replayed rename")
    orphan = new_id(1)
    (spool.tmp / orphan).write_bytes(b"partial")
    now = time.time()
    old = now - LEFTOVER_AGE - 60
    os.utime(spool.tmp / orphan, (old, old))
    found = {left.path.name: left for left in spool.leftovers(now=now)}
    assert set(found) == {committed.id, orphan}
    assert found[committed.id].committed is True
    assert found[orphan].committed is False
    assert found[orphan].age == pytest.approx(LEFTOVER_AGE + 60, abs=1)
    assert 0 <= found[committed.id].age < 60
    assert found[orphan].path == spool.tmp / orphan


def test_concurrent_writes_all_land(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", 3, split=1)  # one directory: every commit contends for its fsync
    written: list[tuple[Envelope, bytes]] = []
    lock = threading.Lock()
    errors: list[BaseException] = []
    barrier = threading.Barrier(16)

    def writer(n: int) -> None:
        try:
            barrier.wait()
            for i in range(20):
                body = b"thread %d message %d\r\n" % (n, i) * (i + 1)
                envelope = make(body)
                spool.write(envelope, body)
                with lock:
                    written.append((envelope, body))
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(written) == 320
    assert spool.count() == 320
    for envelope, body in written:
        assert spool.read(envelope.id) == replace(envelope, shard=spool.shard)  # a read says where it lies
        assert spool.body(envelope.id) == body
    assert files(spool.tmp) == []


_CHILD = """
import sys
from pathlib import Path
from core.envelope import Envelope, Recipient
from core.spool import Spool
root, message_id, body_file = sys.argv[1:4]
body = Path(body_file).read_bytes()
envelope = Envelope(message_id, "a@example.com", (Recipient("b@example.net", "remote"),), 1.0, size=len(body))
try:
    Spool(root, 0, 5).write(envelope, body)
except OSError as exc:
    print("errno", exc.errno)
    sys.exit(3)
print("written")
"""


def run_child(
    tmp_path: Path, env_extra: dict[str, str], body: bytes = BODY
) -> tuple[str, subprocess.CompletedProcess[bytes]]:
    """Write one message in a fresh interpreter (core.faults reads its variables at import)."""
    message_id = new_id(9)
    body_file = tmp_path / "body"
    body_file.write_bytes(body)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHARDMAIL_")} | env_extra
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, str(tmp_path / "spool"), message_id, str(body_file)],
        cwd=REPO, env=env, capture_output=True, timeout=30,
    )
    return message_id, result


def test_injected_enospc_leaves_nothing(tmp_path: Path) -> None:
    _, result = run_child(tmp_path, {"SHARDMAIL_FAULT": "spool.write=ENOSPC"})
    assert result.returncode == 3, result.stderr
    assert result.stdout.split() == [b"errno", str(errno.ENOSPC).encode()]
    spool = Spool(tmp_path / "spool", 0, 5)
    assert files(spool.tmp) == []
    assert files(spool.queue) == []


def test_child_without_faults_commits(tmp_path: Path) -> None:
    message_id, result = run_child(tmp_path, {})
    assert result.returncode == 0, result.stderr
    assert Spool(tmp_path / "spool", 0, 5).body(message_id) == BODY


@pytest.mark.crash
@pytest.mark.parametrize("body", [BODY, os.urandom(100_000)], ids=["small", "large"])
def test_crash_after_data_write_commits_nothing(tmp_path: Path, body: bytes) -> None:
    message_id, result = run_child(tmp_path, {"SHARDMAIL_CRASH_AT": "after_data_write"}, body)
    assert result.returncode == -9, result.stderr
    spool = Spool(tmp_path / "spool", 0, 5)
    assert files(spool.queue) == []
    assert list(spool.scan()) == []
    leftovers = list(spool.leftovers())
    assert [left.path for left in leftovers] == [spool.tmp / message_id]
    assert leftovers[0].committed is False
    assert 0 <= leftovers[0].age < 60


@pytest.mark.crash
@pytest.mark.parametrize("point", ["after_rename", "after_commit"])
@pytest.mark.parametrize("body", [BODY, os.urandom(100_000)], ids=["small", "large"])
def test_crash_after_rename_or_commit_keeps_message_intact(tmp_path: Path, point: str, body: bytes) -> None:
    message_id, result = run_child(tmp_path, {"SHARDMAIL_CRASH_AT": point}, body)
    assert result.returncode == -9, result.stderr
    assert b"written" not in result.stdout
    spool = Spool(tmp_path / "spool", 0, 5)
    assert [entry.id for entry in spool.scan() if not entry.error] == [message_id]
    assert spool.body(message_id) == body
    assert spool.read(message_id).recipients == (Recipient("b@example.net", "remote"),)
    assert list(spool.leftovers()) == []


def test_batches_of_several_shards_share_two_syncs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ingress's group commit spans every shard (they are picked in turn): the shards on one file
    system share the sync after the writes and the one after the renames, and each file's answer
    goes back to its own batch (one that could not be written fails alone, leaving nothing)."""
    import core.spool

    calls: list[int] = []
    real = core.spool.syncfs

    def counted(fd: int) -> None:
        calls.append(fd)
        real(fd)  # the real system call: only counted

    monkeypatch.setattr(core.spool, "syncfs", counted)
    spools = [Spool(tmp_path / "spool", shard, split=5) for shard in range(3)]
    batches = [(spool, [(replace(make(), shard=spool.shard), BODY) for _ in range(3)]) for spool in spools]
    blocked = batches[1][1][2][0]
    (spools[1].tmp / blocked.id).mkdir()  # this one's tmp/ name is taken: its write fails
    answers = core.spool.write_batches(batches)
    assert core.spool.SYNCFS and len(calls) == 2
    assert [[error is None for error in errors] for errors in answers] == [[True] * 3, [True, True, False], [True] * 3]
    for (spool, items), errors in zip(batches, answers, strict=True):
        for (envelope, _), error in zip(items, errors, strict=True):
            if error is None:
                assert spool.read(envelope.id) == envelope
                assert spool.body(envelope.id) == BODY
            else:
                assert not spool.path(envelope.id).exists()
    assert [files(spool.tmp) for spool in spools] == [[], [], []]
    calls.clear()
    assert core.spool.write_batches([(spools[0], [(make(), BODY)])]) == [[None]]
    assert calls == []  # a batch of one file: its fsync and its directory's, no syncfs
