"""workers.maildir on a real file system: unnamed tmp files, the link that refuses a second copy,
and the named tmp file where O_TMPFILE is not offered."""

from __future__ import annotations

from pathlib import Path

import pytest

from workers import maildir
from workers.maildir import Maildir


def test_first_attempt_creates_the_maildir_and_leaves_tmp_empty(tmp_path: Path) -> None:
    box = Maildir(tmp_path / "u")
    assert box.deliver("1.Q1R0.h,S=5", b"hello", retry=False) is True
    assert (tmp_path / "u" / "new" / "1.Q1R0.h,S=5").read_bytes() == b"hello"
    assert (tmp_path / "u" / "cur").is_dir()
    assert list((tmp_path / "u" / "tmp").iterdir()) == []


def test_a_second_copy_is_refused_by_the_link_even_on_a_first_attempt(tmp_path: Path) -> None:
    box = Maildir(tmp_path / "u")
    assert box.deliver("n", b"one", retry=False) is True
    assert box.deliver("n", b"two", retry=False) is False
    assert (tmp_path / "u" / "new" / "n").read_bytes() == b"one"
    assert list((tmp_path / "u" / "tmp").iterdir()) == []


def test_a_retry_finds_the_copy_a_reader_moved_to_cur(tmp_path: Path) -> None:
    box = Maildir(tmp_path / "u")
    box.deliver("n", b"one", retry=False)
    (tmp_path / "u" / "new" / "n").rename(tmp_path / "u" / "cur" / "n:2,S")
    assert box.deliver("n", b"one", retry=True) is False
    assert list((tmp_path / "u" / "new").iterdir()) == []


def test_named_tmp_files_where_o_tmpfile_is_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(maildir, "_tmpfile_ok", False)
    box = Maildir(tmp_path / "u")
    assert box.deliver("n", b"one", retry=False) is True
    assert box.deliver("n", b"two", retry=False) is False
    assert (tmp_path / "u" / "new" / "n").read_bytes() == b"one"
    assert list((tmp_path / "u" / "tmp").iterdir()) == []


def test_a_batch_is_committed_together_and_a_second_copy_is_refused(tmp_path: Path) -> None:
    boxes = [Maildir(tmp_path / "a"), Maildir(tmp_path / "b")]
    boxes[0].deliver("old", b"earlier attempt", retry=False)
    staged = [boxes[0].stage("m1", b"one", retry=False), boxes[1].stage("m2", b"two", retry=False),
              boxes[0].stage("old", b"again", retry=False)]
    assert all(isinstance(s, maildir.Staged) for s in staged)
    assert list((tmp_path / "a" / "new").iterdir()) == [tmp_path / "a" / "new" / "old"]  # nothing visible yet
    assert maildir.commit(staged) == [True, True, False]  # type: ignore[arg-type]
    assert (tmp_path / "a" / "new" / "m1").read_bytes() == b"one"
    assert (tmp_path / "b" / "new" / "m2").read_bytes() == b"two"
    assert (tmp_path / "a" / "new" / "old").read_bytes() == b"earlier attempt"
    assert list((tmp_path / "a" / "tmp").iterdir()) == [] and list((tmp_path / "b" / "tmp").iterdir()) == []


def test_a_retry_stages_nothing_when_the_copy_was_read_already(tmp_path: Path) -> None:
    box = Maildir(tmp_path / "u")
    box.deliver("n", b"one", retry=False)
    (tmp_path / "u" / "new" / "n").rename(tmp_path / "u" / "cur" / "n:2,S")
    assert box.stage("n", b"one", retry=True) is False
