"""A POP3 session's view of one Maildir: locked, listed once, changed only at QUIT.

Interface: ``Mailbox.open(path) -> Mailbox`` (raises ``MailboxBusy`` while another session holds
it); ``messages`` (``Message``: ``number`` from 1, ``uid``, ``size`` in octets as sent); ``wire(n)``
(the message with CRLF line ends, as RETR sends it before dot-stuffing); ``top(n, lines)``;
``expunge(numbers) -> int`` (how many could not be removed); ``close()``.

Semantics as qmail-pop3d and Dovecot: at open every file of ``new/`` is renamed into ``cur/`` with
the ``:2,`` info suffix, then ``cur/`` is listed once, in delivery order (the time stamp that
starts a Maildir name, then the name): message numbers hold for the whole session. The UIDL of a
message is its Maildir unique name, the part before ``:``, which no reader changes (flags live
after it), so it is the same in every session, after a crash, and after another reader (IMAP)
set flags. Nothing changes on disk until ``expunge`` at QUIT (the UPDATE state): a session that
ends any other way (RSET, a lost connection, a killed server) removes nothing. Removed files are
made durable with an fsync of ``cur/`` before QUIT's +OK. Quotas (workers.quota) count the files
of ``new/`` and ``cur/`` and their ``,S=``: removing the file is all that keeps them right.

The lock: an exclusive, non-blocking ``flock`` on ``pop3lock`` at the Maildir's top (beside
``quotawarn``; no Maildir reader looks there), held by the open descriptor for the session. The
kernel drops it when the descriptor closes, which includes the death of the process: a crashed
or killed session never leaves a stale lock behind, and no lock file contents need cleaning.

Sizes: files hold LF line ends (workers.local); LIST, STAT and the octet counts give the size as
sent (CRLF), computed by reading the file once and kept per process by inode and size.

Failures: ``OSError`` from the disk (the caller answers ``-ERR [SYS/TEMP]``); a file that vanished
since the listing (another reader removed it) gives ``None`` from ``wire``/``top``.

Settings: none.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from pathlib import Path

LOCK_FILE = "pop3lock"
INFO = ":2,"
_SIZE_CACHE_LIMIT = 200_000
_sizes: dict[tuple[int, int, int], int] = {}  # (device, inode, file size) -> size as sent


class MailboxBusy(Exception):
    """Another POP3 session holds this mailbox."""


@dataclass(slots=True)
class Message:
    number: int
    name: str  # the file name in cur/
    uid: str
    size: int = -1  # octets as sent; -1 until measured


def crlf(data: bytes) -> bytes:
    """The message with CRLF line ends and a final line end, whatever the file held."""
    data = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return data if not data or data.endswith(b"\r\n") else data + b"\r\n"


def _order(name: str) -> tuple[int, str]:
    stamp = name.split(".", 1)[0]
    return (int(stamp) if stamp.isdigit() else 0, name)


class Mailbox:
    def __init__(self, path: Path, lock_fd: int, messages: list[Message]) -> None:
        self.path = path
        self._cur = f"{path}/cur"
        self._lock_fd = lock_fd
        self.messages = messages

    @classmethod
    def open(cls, path: Path) -> Mailbox:
        """Lock, move new/ into cur/, list cur/ (blocking: run it in a thread)."""
        for sub in ("tmp", "new", "cur"):
            os.makedirs(path / sub, mode=0o700, exist_ok=True)
        fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise MailboxBusy(str(path)) from None
        except BaseException:
            os.close(fd)
            raise
        try:
            messages = cls._scan(path)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, messages)

    @staticmethod
    def _scan(path: Path) -> list[Message]:
        new, cur = f"{path}/new", f"{path}/cur"
        for name in os.listdir(new):
            if name.startswith("."):
                continue
            target = name if ":" in name else name + INFO
            try:
                os.rename(f"{new}/{name}", f"{cur}/{target}")
            except FileNotFoundError:  # another reader took it first
                continue
        names = sorted((n for n in os.listdir(cur) if not n.startswith(".")), key=_order)
        return [Message(i, name, name.split(":", 1)[0]) for i, name in enumerate(names, 1)]

    def get(self, number: int) -> Message | None:
        return self.messages[number - 1] if 0 < number <= len(self.messages) else None

    def _read(self, message: Message) -> bytes | None:
        try:
            with open(f"{self._cur}/{message.name}", "rb") as handle:
                return handle.read()
        except FileNotFoundError:
            pass
        for name in os.listdir(self._cur):  # another reader may have changed its flags
            if name.split(":", 1)[0] == message.uid:
                message.name = name
                try:
                    with open(f"{self._cur}/{name}", "rb") as handle:
                        return handle.read()
                except FileNotFoundError:
                    return None
        return None

    def measure(self, message: Message) -> int:
        """The size as sent; 0 for a message that vanished (blocking)."""
        if message.size >= 0:
            return message.size
        try:
            info = os.stat(f"{self._cur}/{message.name}")
            key = (info.st_dev, info.st_ino, info.st_size)
        except FileNotFoundError:
            key = None
        if key is not None and key in _sizes:
            message.size = _sizes[key]
            return message.size
        data = self._read(message)
        message.size = 0 if data is None else len(crlf(data))
        if key is not None and data is not None:
            if len(_sizes) >= _SIZE_CACHE_LIMIT:
                _sizes.clear()
            _sizes[key] = message.size
        return message.size

    def measure_all(self) -> None:
        for message in self.messages:
            self.measure(message)

    def wire(self, message: Message) -> bytes | None:
        data = self._read(message)
        return None if data is None else crlf(data)

    def top(self, message: Message, lines: int) -> bytes | None:
        """The header, the blank line and the first ``lines`` lines of the body."""
        data = self.wire(message)
        if data is None:
            return None
        if data.startswith(b"\r\n"):
            head, body = b"", data[2:]
        else:
            head, sep, body = data.partition(b"\r\n\r\n")
            if not sep:
                return data
            head += b"\r\n"
        kept = body.split(b"\r\n")[:-1][:lines]
        return head + b"\r\n" + b"".join(line + b"\r\n" for line in kept)

    def expunge(self, numbers: set[int]) -> int:
        """Remove the messages marked deleted; the count that could not be (blocking)."""
        failed = 0
        for number in sorted(numbers):
            message = self.get(number)
            if message is None:
                continue
            try:
                os.unlink(f"{self._cur}/{message.name}")
            except FileNotFoundError:
                if self._read(message) is not None:  # renamed by another reader: its new name
                    try:
                        os.unlink(f"{self._cur}/{message.name}")
                    except OSError:
                        failed += 1
            except OSError:
                failed += 1
        if numbers:
            directory = os.open(self._cur, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
        return failed

    def close(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # and with it the lock
            self._lock_fd = -1
