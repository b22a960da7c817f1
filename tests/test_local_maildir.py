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
