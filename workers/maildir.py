"""Maildir delivery, and where a user's Maildir may be.

Interface: ``Maildir(path)`` with
``deliver(name, data) -> bool`` (False: that copy was already there), ``usage() -> (bytes, count)``,
``stage(name, data) -> Staged | bool | None``, ``claim_warning(period) -> float | None``;
``commit(staged) -> list[bool | OSError]``, ``discard(staged)``; ``file_name(birth, message_id, index,
size, host)``.

Batches (the local pool's group commit): ``stage`` writes the unnamed tmp file without syncing it;
``commit`` makes a whole batch durable with one ``syncfs`` per file system, links every file into
its new/, and makes the links durable with a second ``syncfs``: two device flushes for the batch
instead of two per message. A staged file is invisible until its link, and gone if the process
dies first; a link is only reported (True) once it is durable.

A delivery is tmp/ → fsync → link into new/ → fsync of new/: the message is in the mailbox once
the link is durable, and never half-written. The tmp/ file is an unnamed ``O_TMPFILE`` inode in
tmp/ where the kernel offers it (linked into new/ through /proc/self/fd): no name to create and
remove in tmp/, and nothing left behind by a crash; otherwise a named private tmp/ file. The file
name is fixed by queue id + recipient index (not by the time of the attempt), so an attempt
repeated after a crash between the link and the spool's mark finds its own earlier copy in new/ or
cur/ and does not deliver a second one.
Names carry ``,S=<size>`` (the Maildir++ convention IMAP servers read for quotas).

``claim_warning`` keeps the time of the mailbox's last quota warning in a ``quotawarn`` file at its
top (beside new/, cur/ and tmp/, where Maildir readers look for nothing), read and rewritten under
an exclusive ``flock``, so concurrent deliveries (threads or processes) claim one warning between
them: a timestamp file per mailbox, as qmail-ldap keeps, and no shared state elsewhere.

Failures: ``OSError`` from the disk, for the caller to treat as temporary. (Where a Maildir may
be at all is core.directory's ``resolve_store``.)

Settings: none.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import threading
import time
from pathlib import Path

from core import faults
from core.spool import SYNCFS, syncfs


def _host_part() -> str:
    return socket.gethostname().replace("/", "\\057").replace(":", "\\072")


HOST = _host_part()
WARNING_STAMP = "quotawarn"
_PROC_FD = os.path.isdir("/proc/self/fd")
_tmpfile_ok = _PROC_FD and hasattr(os, "O_TMPFILE")


def file_name(birth: float, message_id: str, index: int, size: int, host: str = HOST) -> str:
    return f"{int(birth)}.Q{message_id}R{index}.{host},S={size}"


class Maildir:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._tmp = f"{path}/tmp"  # plain strings for the per-message calls
        self._new = f"{path}/new"

    def _ensure(self) -> None:
        for sub in ("tmp", "new", "cur"):
            (self.path / sub).mkdir(mode=0o700, parents=True, exist_ok=True)

    def has(self, name: str, look_in_cur: bool = True) -> bool:
        """An earlier attempt's copy, in new/ or already seen by a reader (cur/, with flags).
        Looking in cur/ lists it (a big mailbox makes that costly), so first attempts skip it."""
        if os.path.exists(f"{self._new}/{name}"):
            return True
        if not look_in_cur:
            return False
        try:
            return any(entry == name or entry.startswith(name + ":") for entry in os.listdir(self.path / "cur"))
        except FileNotFoundError:
            return False

    def deliver(self, name: str, data: bytes, retry: bool = True) -> bool:
        """Write one message durably; False if this very copy was delivered before. ``retry=False``
        (a first attempt, which cannot have left a copy that a reader moved on) relies on the link
        into new/, which fails if the copy is there, and looks for nothing beforehand."""
        if retry and self.has(name):
            return False
        if _tmpfile_ok:
            fresh = self._deliver_unnamed(name, data)
            if fresh is not None:
                return fresh
        return self._deliver_named(name, data)

    def _deliver_unnamed(self, name: str, data: bytes) -> bool | None:
        """tmp/ → new/ with an O_TMPFILE inode; None if the file system does not offer one."""
        fd = self._tmpfile()
        if fd is None:
            return None
        try:
            _write_all(fd, data)
            os.fsync(fd)
            directory = os.open(self._new, os.O_RDONLY | os.O_DIRECTORY)
            try:
                if not _link(fd, directory, name):
                    return False  # this copy was delivered before (or by a racing attempt)
                os.fsync(directory)
            finally:
                os.close(directory)
        finally:
            os.close(fd)
        faults.crash_point("after_maildir_link")
        return True

    def _deliver_named(self, name: str, data: bytes) -> bool:
        if not (self.path / "new").is_dir():
            self._ensure()
        # Each attempt writes its own tmp file; the fixed name only appears with the link, so two
        # attempts of the same copy racing each other end with one file, never a torn one.
        tmp = self.path / "tmp" / f"{name}.{os.getpid()}.{threading.get_ident()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, self.path / "new" / name)
        except FileExistsError:
            os.unlink(tmp)
            return False
        os.unlink(tmp)
        directory = os.open(self.path / "new", os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
        faults.crash_point("after_maildir_link")
        return True

    def stage(self, name: str, data: bytes, retry: bool = True) -> Staged | bool | None:
        """Write ``data`` to an unnamed tmp file for ``commit``: a ``Staged``; False if this copy
        was delivered before; None where O_TMPFILE is missing (use ``deliver``)."""
        if not _tmpfile_ok or not SYNCFS:
            return None
        if retry and self.has(name):
            return False
        fd = self._tmpfile()
        if fd is None:
            return None
        try:
            _write_all(fd, data)
        except BaseException:
            os.close(fd)
            raise
        return Staged(self, name, fd)

    def _tmpfile(self) -> int | None:
        global _tmpfile_ok
        try:
            return os.open(self._tmp, os.O_WRONLY | os.O_TMPFILE, 0o600)
        except FileNotFoundError:
            self._ensure()
            return os.open(self._tmp, os.O_WRONLY | os.O_TMPFILE, 0o600)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                _tmpfile_ok = False
                return None
            raise

    def claim_warning(self, period: int) -> float | None:
        """The time of a quota warning due now (none was claimed in the last ``period`` seconds, or
        the clock went back past the last one), recorded as claimed; None when none is due. The
        time is read under the lock: one read before it could be older than a stamp a racing
        delivery has just written, and would look like a clock gone back."""
        try:
            fd = os.open(f"{self.path}/{WARNING_STAMP}", os.O_RDWR | os.O_CREAT, 0o600)
        except FileNotFoundError:
            self._ensure()
            fd = os.open(f"{self.path}/{WARNING_STAMP}", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            now = time.time()
            try:
                last = float(os.read(fd, 64).decode("ascii").strip() or "-inf")
            except ValueError:  # unreadable: as if never warned
                last = float("-inf")
            if 0 <= now - last < period:
                return None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{now:.6f}\n".encode(), 0)  # not rounded: a rounded-up stamp looks like a clock gone back
            return now
        finally:
            os.close(fd)  # and with it the lock

    def usage(self) -> tuple[int, int]:
        """(bytes, messages) in new/ and cur/, from the ,S= of names where present."""
        total = count = 0
        for sub in ("new", "cur"):
            try:
                entries = os.scandir(self.path / sub)
            except FileNotFoundError:
                continue
            with entries:
                for entry in entries:
                    count += 1
                    size = _size_from_name(entry.name)
                    total += size if size is not None else entry.stat().st_size
        return total, count


class Staged:
    """A message in an unnamed, not yet durable tmp file of ``maildir``, to be linked as ``name``."""

    __slots__ = ("fd", "maildir", "name")

    def __init__(self, maildir: Maildir, name: str, fd: int) -> None:
        self.maildir = maildir
        self.name = name
        self.fd = fd


def commit(staged: list[Staged]) -> list[bool | OSError]:
    """Make staged files durable and link them into their new/ (see the module notes): per file
    True (delivered), False (that copy was there already) or the OSError that kept it out (for
    the caller, a temporary failure: nothing is reported delivered before it is durable). Closes
    every file."""
    results: list[bool | OSError] = [False] * len(staged)
    try:
        groups: dict[int, list[int]] = {}  # device -> indexes; the first file's open predates all writes
        for index, item in enumerate(staged):
            try:
                groups.setdefault(os.fstat(item.fd).st_dev, []).append(index)
            except OSError as exc:
                results[index] = exc
        for indexes in groups.values():
            error = _capture_syncfs(staged[indexes[0]].fd)
            linked = []
            for index in indexes:
                item = staged[index]
                if error is not None:
                    results[index] = error
                    continue
                try:
                    directory = os.open(item.maildir._new, os.O_RDONLY | os.O_DIRECTORY)
                    try:
                        results[index] = _link(item.fd, directory, item.name)
                    finally:
                        os.close(directory)
                except OSError as exc:
                    results[index] = exc
                if results[index] is True:
                    linked.append(index)
            if linked:
                error = _capture_syncfs(staged[indexes[0]].fd)
                if error is not None:
                    for index in linked:  # maybe linked, maybe not after a crash: retried, found by name
                        results[index] = error
                else:
                    faults.crash_point("after_maildir_link")
    finally:
        for item in staged:
            os.close(item.fd)
    return results


def discard(staged: list[Staged]) -> None:
    """Drop staged files without linking them (nothing of them stays: their inodes were never named)."""
    for item in staged:
        os.close(item.fd)
    staged.clear()


def _capture_syncfs(fd: int) -> OSError | None:
    try:
        syncfs(fd)
    except OSError as exc:
        return exc
    return None


def _link(fd: int, directory: int, name: str) -> bool:
    """Name an O_TMPFILE inode in ``directory``; False if the name exists. linkat(AT_SYMLINK_FOLLOW)
    of the /proc link is the one way without CAP_DAC_READ_SEARCH (a dir fd makes Python use it)."""
    try:
        os.link(f"/proc/self/fd/{fd}", name, dst_dir_fd=directory, follow_symlinks=True)
    except FileExistsError:
        return False
    return True


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _size_from_name(name: str) -> int | None:
    marker = name.find(",S=")
    if marker < 0:
        return None
    digits = name[marker + 3 :].split(":", 1)[0].split(",", 1)[0]
    return int(digits) if digits.isdigit() else None
