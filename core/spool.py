"""The spool: the durable ledger of every accepted message; the only module that knows its paths.

Interface: ``Spool(root, shard, split)`` with ``write(envelope, body) -> Path``, ``write_batch(items)``
(and ``write_batches([(spool, items), ...])``, several shards' batches sharing the syncs),
``withdraw(ids)``, ``read(id) -> Envelope``, ``body(id) -> bytes``, ``load(id)``, ``mark(id, marks)``,
``mark_many(items)`` (checkpoints of several entries, one flush), ``move_to(spool, ids)`` (into
another shard, for the rebalancer), ``remove(id)``, ``scan() -> Iterator[Entry]``,
``leftovers() -> Iterator[Leftover]``, ``quarantine(id)``, ``count()``; ``syncfs(fd)`` and
``SYNCFS`` (whether it is available), the group commit of several files' writes. Held mail
(``shardmail queue``): ``hold(id)``, ``unhold(id)``, ``write_held(envelope, body)`` (a message
moved in from another node while held there), ``held()``, ``held_path(id)``, ``where(id)``,
``peek(id, held=False)`` (envelope and marks without reading the body), ``find(id) -> Entry``
(queued or held), ``entries(held=False) -> Iterator[Entry]``, ``load(id, held=True)``,
``discard(id, held=False)`` (an admin's delete, durable). Listings for the ops views:
``census(listings) -> Counts`` (entries, held ones and the oldest id, from directory listings
alone, ``Listings`` remembering them between calls), ``queue_dirs()`` and ``heads(directory)``
(every entry's envelope line and marks, bodies unread: qshape's fast path, shared out among
processes by directory); ``Spool.directory(root, shard)`` (a shard's directory, for the shard map).

Layout of one shard (``<root>/s<shard>/``)::

    tmp/<id>                 a message being written (not yet accepted)
    queue/<split>/<id>       a committed message: one line of envelope JSON, the body (CRLF), then
                             the marks appended after each delivery attempt, one JSON line each
    corrupt/<id>             entries the sweep could not decode, moved aside for a human
    hold/<id>                a committed message on hold (``shardmail queue hold``): the same file,
                             renamed; no delivery, scan, sweep or recover looks here, so it is
                             neither delivered nor expired nor bounced until ``unhold`` renames it back
    free/<slot>              spent files kept for reuse: contents meaningless, never read

One file per message: a single rename commits envelope and body together, and a mark is one
``write`` + ``fdatasync`` on the same file, so per-recipient checkpoints cost no directory fsync.

Crash-state table (what a crash leaves, the one syscall that moves a message on, what the sweep does)

====================  ==============================  ======================  ==========================
state                 files that exist                next syscall            sweep on a leftover
====================  ==============================  ======================  ==========================
1 writing             tmp/<id> (partial or unsynced)  fsync(tmp/<id>)         unlink when older than 36 h
2 written             tmp/<id> complete, fsync'd      rename -> queue/..      unlink when older than 36 h
3 committed           queue/<s>/<id>                  fsync(queue/<s>)        (rename may be lost: = 2)
4 accepted (250 due)  queue/<s>/<id>, durable         Redis enqueue           enqueue it (job missing)
5 queued              queue/<s>/<id> + rq job         delivery, then mark     none: job present
6 delivered, unmarked queue/<s>/<id>, mark missing    write+fdatasync(mark)   enqueue: attempt again
7 marked              queue/<s>/<id> + mark lines     next recipient / unlink enqueue pending ones
8 all final           queue/<s>/<id>, all marked      unlink(queue/<s>/<id>)  unlink it
9 gone                nothing                         -                       -
====================  ==============================  ======================  ==========================

A message whose recipients are all delivered locally in one attempt skips state 7: the unlink
follows the deliveries directly (if a crash undoes it, the Maildir names find the copies again).

A 250 is sent only in state 4 or later: the client retries anything it did not see accepted, and
a tmp/ file never becomes a delivery (so an interrupted write is simply lost, as it must be, since
it was never acknowledged). Duplicates come only from state 6: a local delivery names its Maildir
file after id + recipient and finds it there (0 duplicates); a remote one whose reply to "." was
lost is sent again (at most one duplicate per crash). A tmp/<id> beside a committed queue/<s>/<id>
(rename replayed after a crash) is removed at once. When the 250 cannot be given after state 3
or 4 (Redis down), ``withdraw`` takes the message back to state 9 (unlink + directory fsync).

Hold and release are one rename each between queue/<s>/ and hold/, then an fsync of the directory
gained and of the one left: a rename is atomic, so a crash leaves the message in one of the two
places, never in none (and an ``unhold`` that finds both names, a hard-link leftover, drops the
hold/ one). A message held while a worker has it loaded is gone for that worker: its checkpoint
finds no file and is dropped (the admin tool waits for attempts in flight unless forced; see
ops.queue). ``discard`` (an admin's delete) is an unlink plus a directory fsync, so a deleted
message does not come back after a crash.

A rebalance moves a committed entry to another shard's queue/ with one rename (atomic: after a
crash the file has exactly one of its two names, each a committed entry of its shard), then makes
the directories durable; readers take the shard an entry lies in, not the one its envelope names.

Spent files are recycled, not deleted: ``remove`` renames a small finished entry to one of
``FREE_SLOTS`` names in free/ (replacing what is there when the pool is full), and a write takes a
file from free/ (rename to tmp/<id>, overwrite, truncate to size) before it creates one. On this
kind of ext4 (no journal) every inode freed in the last minutes is skipped, one buffer lookup each,
by every later file creation in the same block group: at a few hundred messages a second, one
unlink per message made each create (spool *and* Maildir) cost 0.3-0.6 ms of CPU. A file in free/
is garbage in every crash state: a rename into or out of free/ that a crash loses leaves a tmp/
leftover or an entry that is again in queue/ (both handled as above); a name in queue/ whose
envelope names another id is such a leftover too (``scan`` reports it, it is never delivered).
A reader that opened an entry just before it was recycled may read the next message in that file:
every read checks the id inside against the name asked for (``Recycled``, a FileNotFoundError).

Writes come in batches (``write_batch``, used by ingress's group commit): every file of a batch is
durable before its rename, and each split directory touched is durable before the batch returns;
the split directory follows the id's arrival time, so a batch touches one or two of them. A batch
of one is an fsync of the file and one of its directory; a bigger batch is one ``syncfs`` after
the writes and one after the renames (Linux >= 5.8, which reports every write-back error since the
first file was opened): the whole file system's dirty data, inodes and directories with one device
cache flush, instead of a flush per file (measured here: 60-80 against 180-220 us of CPU per file,
and a fraction of the device round trips). ``write_batches`` does the same for several shards'
batches at once, so the shards on one file system share those two syncs; the quick calls of a
write (open, rename, write, ftruncate, close) go through core.syscalls, which keeps the
interpreter lock, so the committing thread does not queue for it behind the event loop after each.

Failures: every ``OSError`` (ENOSPC, EIO, EROFS...) propagates to the caller, which treats it as a
temporary failure; ``write`` removes its own partial file first. ``scan`` never raises for a bad
entry: it yields it with ``error`` set.

Settings: ``spool_dir`` (via the root passed in), ``queue_split``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import itertools
import json
import logging
import os
import random
import re
import shutil
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

from core import faults, syscalls
from core.envelope import FORMAT_VERSION, Envelope, EnvelopeError, Mark, decode, decode_marks, encode, encode_mark

log = logging.getLogger("shardmail.spool")
LEFTOVER_AGE = 36 * 3600  # qmail's rule: a tmp file this old belongs to no living writer
SPLIT_STEP_US = 100_000
FREE_SLOTS = 1024  # spent files kept per shard for reuse
RECYCLE_MAX = 32 * 1024  # bigger files are deleted: a pool of them would hold too much disk
COPY_CHUNK = 1 << 20  # bytes per read when an entry is copied in from another file system
FREE_RELIST = 0.05  # s between listings of an empty free/
TRUST_AFTER_NS = 1_000_000_000  # a directory's mtime this much older than our listing's start is settled
HEAD = 2048  # bytes ``heads`` reads first: the envelope line, and the marks too when the body is short
CHUNK = 4096  # bytes per further read of the marks
NOATIME = getattr(os, "O_NOATIME", 0)  # a look at the queue must not dirty a million inodes (relatime's first read)
_ID = re.compile(r"[0-9A-F]{26}")
_DECODER = json.JSONDecoder()


@dataclass(frozen=True, slots=True)
class Entry:
    """One spool entry as a reader found it (``scan``, ``entries``, ``find``): its id, the shard it
    lies in, whether it is on hold, and its envelope with marks; ``envelope`` is None when ``error``
    says why it could not be read; ``file`` is where it lies (``path``, the same as a Path)."""

    id: str
    shard: int
    envelope: Envelope | None
    held: bool = False
    error: str = ""
    file: str = ""

    @property
    def path(self) -> Path:
        return Path(self.file)

    @property
    def read(self) -> Envelope:
        """The envelope of an entry its reader vouches for (listings that report unreadable ones
        apart); asking it of an unreadable entry is a bug."""
        if self.envelope is None:
            raise ValueError(f"{self.id}: unreadable spool entry ({self.error})")
        return self.envelope


@dataclass(frozen=True, slots=True)
class Leftover:
    """A tmp/ file: an interrupted write (or a rename replayed after a crash)."""

    path: Path
    age: float
    committed: bool  # the same id is already in queue/


@dataclass(frozen=True, slots=True)
class Counts:
    """A shard's spool from its directory listings: committed entries, held ones, the oldest
    committed entry's id (ids begin with their arrival time; None when there is none)."""

    spooled: int
    held: int
    oldest: str | None


@dataclass(slots=True)
class _Listing:
    mtime_ns: int
    listed_ns: int
    count: int
    oldest: str | None


class Listings:
    """Directory listings remembered between censuses: a directory whose mtime has not moved since
    a listing that started at least ``TRUST_AFTER_NS`` after that mtime cannot have changed (a later
    create, rename or unlink would move it), so a census of an idle queue costs a stat per directory."""

    def __init__(self) -> None:
        self._seen: dict[str, _Listing] = {}

    def take(self, path: str) -> _Listing:
        started = time.time_ns()
        try:
            mtime = os.stat(path).st_mtime_ns
        except FileNotFoundError:
            return _Listing(0, started, 0, None)
        known = self._seen.get(path)
        if known is not None and known.mtime_ns == mtime and known.listed_ns - mtime >= TRUST_AFTER_NS:
            return known
        try:
            names = os.listdir(path)
        except FileNotFoundError:
            names = []
        oldest = min(names, default=None)
        if oldest is not None and not _ID.fullmatch(oldest):
            oldest = min((n for n in names if _ID.fullmatch(n)), default=None)
        listing = self._seen[path] = _Listing(mtime, started, len(names), oldest)
        return listing


class Recycled(FileNotFoundError):
    """A spool name whose file now holds another message: for every reader, that entry is gone."""


class _DirSync:
    """Shares directory fsyncs among concurrent committers (group commit).

    A caller needs an fsync that *starts* after its rename; if one is already running, it waits for
    the next one, which then covers every rename made while the first was running.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._cond = threading.Condition()
        self._started = 0
        self._done = 0
        self._running = False

    def sync(self) -> None:
        with self._cond:
            need = self._started + 1
            while self._done < need:
                if not self._running:
                    break
                self._cond.wait()
            else:
                return
            self._running = True
            self._started += 1
            generation = self._started
        synced = False
        try:
            fd = os.open(self._path, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            synced = True
        finally:
            with self._cond:
                self._running = False
                if synced:
                    self._done = generation
                self._cond.notify_all()


class Spool:
    """One shard's spool directory."""

    def __init__(self, root: str | os.PathLike[str], shard: int, split: int = 23) -> None:
        self.shard = shard
        self.split = split
        self.base = self.directory(root, shard)
        self.tmp = self.base / "tmp"
        self.queue = self.base / "queue"
        self.corrupt = self.base / "corrupt"
        self.free = self.base / "free"
        self.hold_dir = self.base / "hold"
        self._syncers = {}
        self._free_names: list[str] = []
        self._free_listed = 0.0
        self._free_lock = threading.Lock()
        self._slots = itertools.count(random.randrange(FREE_SLOTS))
        for directory in (self.tmp, self.corrupt, self.free, self.hold_dir,
                          *(self.queue / str(i) for i in range(split))):
            directory.mkdir(parents=True, exist_ok=True)
        for i in range(split):
            self._syncers[i] = _DirSync(self.queue / str(i))
        # The same directories as plain strings, for the per-message system calls (a pathlib join
        # and its str() cost more than the call they name)
        self._tmp_s = f"{self.tmp}/"
        self._free_s = f"{self.free}/"
        self._hold_s = f"{self.hold_dir}/"
        self._hold_sync = _DirSync(self.hold_dir)
        self._queue_s = [f"{self.queue}/{i}/" for i in range(split)]
        self.device = os.stat(self.base).st_dev  # spools on one file system share a group commit's syncs

    @staticmethod
    def directory(root: str | os.PathLike[str], shard: int) -> Path:
        """Where a shard's spool lies under the spool root (whether or not it exists yet)."""
        return Path(root) / f"s{shard}"

    def _bucket(self, message_id: str) -> int:
        """The split directory: from the id's arrival time in 0.1 s steps, turning over all of them.

        Messages committed together arrived together, so a batch touches one or two directories
        and pays one or two directory fsyncs instead of one per message (a hash of the id spread
        each batch of ten over nine directories); over any queue that lives longer than a few
        seconds the directories still fill evenly."""
        try:
            return (int(message_id[:14], 16) // SPLIT_STEP_US) % self.split
        except ValueError:
            return zlib.crc32(message_id.encode()) % self.split

    def path(self, message_id: str) -> Path:
        return self.queue / str(self._bucket(message_id)) / message_id

    def _path(self, message_id: str) -> str:
        return self._queue_s[self._bucket(message_id)] + message_id

    def write(self, envelope: Envelope, body: bytes) -> Path:
        """Commit envelope + body durably; return the committed path. Raises OSError, leaving nothing."""
        error = self.write_batch([(envelope, body)])[0]
        if error is not None:
            raise error
        return self.path(envelope.id)

    def write_batch(self, items: list[tuple[Envelope, bytes]]) -> list[OSError | None]:
        """Commit several messages at once (group commit): per message None, or the OSError that
        kept it out; a failed message leaves nothing behind. Each file is durable before its rename,
        and each queue directory touched is made durable once for the whole batch (see above)."""
        return write_batches([(self, items)])[0]

    def _open_tmp(self, tmp: str) -> tuple[int, bool]:
        """A file for a new message at ``tmp``: a recycled one from free/ (overwritten in place by
        the caller, then truncated), else a new one. (fd, recycled)."""
        while True:
            name = self._free_name()
            if name is None:
                return syscalls.open_file(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), False
            try:
                syscalls.rename(self._free_s + name, tmp)
            except FileNotFoundError:
                continue  # another writer took it
            return syscalls.open_file(tmp, os.O_WRONLY | os.O_NOFOLLOW), True

    def _free_name(self) -> str | None:
        with self._free_lock:
            if not self._free_names:
                now = time.monotonic()
                if now - self._free_listed < FREE_RELIST:
                    return None
                self._free_listed = now
                try:
                    names = os.listdir(self.free)
                except FileNotFoundError:
                    return None
                random.shuffle(names)  # several writers list the same directory: take different files
                self._free_names = names
                if not names:
                    return None
            return self._free_names.pop()

    def _load(self, message_id: str, path: str | None = None) -> tuple[Envelope, int, bytes]:
        """Envelope (with marks), body offset, and the file's bytes (of ``path``: default, queue/)."""
        fd = os.open(path or self._path(message_id), os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            data = os.read(fd, size + 1)  # a short read of a regular file is its end
            if len(data) > size:  # grown since (a mark appended meanwhile): read on to the end
                chunks = [data]
                while chunks[-1]:
                    chunks.append(os.read(fd, 65536))
                data = b"".join(chunks)
        finally:
            os.close(fd)
        parsed = _parse(data)
        if parsed[0].id != message_id:
            # the file was recycled between the open and the read (the entry is gone), or, after a
            # crash without a journal, a stale second name of a reused file (scan reports it)
            raise Recycled(errno.ENOENT, f"spool entry {message_id} now holds {parsed[0].id}")
        if parsed[0].shard != self.shard:  # moved here by a rebalance: where it lies is its shard
            parsed = (replace(parsed[0], shard=self.shard), *parsed[1:])
        return parsed

    def read(self, message_id: str) -> Envelope:
        """The envelope with every durable mark. Raises FileNotFoundError (also ``Recycled``: the
        name now leads to another message's file) or EnvelopeError."""
        return self._load(message_id)[0]

    def body(self, message_id: str) -> bytes:
        return self.load(message_id)[1]

    def load(self, message_id: str, held: bool = False) -> tuple[Envelope, bytes]:
        """Envelope and body with one read of the file (what a delivery needs); ``held``: from hold/."""
        envelope, offset, data = self._load(message_id, self._hold_s + message_id if held else None)
        return envelope, data[offset : offset + envelope.size]

    def mark(self, message_id: str, marks: list[Mark]) -> None:
        """Append outcomes and make them durable before returning (the per-recipient checkpoint)."""
        self._append(message_id, marks, sync=True)

    def mark_many(self, items: list[tuple[str, list[Mark]]]) -> list[OSError | None]:
        """Checkpoints of several entries at once (group commit): per entry None or its OSError.
        All appends, then one ``syncfs`` for them all where it is available (else, and for a single
        entry, an fdatasync each); an entry is durable only when its result is None."""
        if len(items) == 1 or not SYNCFS:
            return [_capture(partial(self.mark, *item)) for item in items]
        anchor = os.open(self.base, os.O_RDONLY | os.O_DIRECTORY)  # syncfs reports errors since this open
        try:
            errors: list[OSError | None] = [_capture(partial(self._append, *item, sync=False)) for item in items]
            shared = _capture(lambda: syncfs(anchor))
        finally:
            os.close(anchor)
        return [error or shared for error in errors]

    def _append(self, message_id: str, marks: list[Mark], sync: bool) -> None:
        blob = b"".join(encode_mark(m) for m in marks)
        fd = os.open(self._path(message_id), os.O_RDWR | os.O_APPEND)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                blob = b"\n" + blob  # a torn earlier append must not swallow this one
            _write_all(fd, blob)
            if sync:
                os.fdatasync(fd)
        finally:
            os.close(fd)

    def withdraw(self, message_ids: list[str]) -> list[str]:
        """Undo commits (unlink + directory fsync): used when the 250 cannot be given, so that a
        message answered with 4xx is not delivered later. Returns the ids it could not unlink: those
        stay committed and count as accepted (the sweep enqueues them). A failing directory fsync
        after the unlinks is logged only: the files are gone, and at worst a crash brings one back
        (a duplicate, never a loss)."""
        kept = []
        for message_id in message_ids:
            try:
                os.unlink(self.path(message_id))
            except FileNotFoundError:
                pass
            except OSError:
                kept.append(message_id)
        for bucket in {self._bucket(m) for m in message_ids if m not in kept}:
            try:
                self._syncers[bucket].sync()
            except OSError as exc:
                log.error("directory fsync after withdrawal failed in %s: %s", self.queue / str(bucket), exc)
        return kept

    def remove(self, message_id: str, size: int | None = None) -> None:
        """Drop a message whose recipients are all final: its file goes to free/ for reuse (small
        ones; ``size``, the body size, saves a stat) or is deleted. Not fsync'd: if this is lost in
        a crash, the sweep finds every recipient marked and removes the file again."""
        path = self._path(message_id)
        try:
            if size is None:
                size = os.stat(path).st_size
            if size > RECYCLE_MAX:
                os.unlink(path)
            else:
                os.rename(path, f"{self._free_s}{next(self._slots) % FREE_SLOTS:04d}")
        except FileNotFoundError:
            pass

    def move_to(self, target: Spool, message_ids: list[str]) -> list[str]:
        """Move committed entries into another shard's spool (the rebalancer): one rename each,
        then the directories made durable (one ``syncfs``, else an fsync of each directory
        touched, the target's first). A rename is atomic, so a crash leaves each message in exactly
        one of the two shards. Returns the ids moved (one that vanished meanwhile is skipped);
        raises OSError when the move could not be made durable."""
        moved = []
        for message_id in message_ids:
            try:
                os.rename(self._path(message_id), target._path(message_id))
            except FileNotFoundError:
                continue
            moved.append(message_id)
        faults.crash_point("after_move_rename")
        if not moved:
            return moved
        if SYNCFS:
            anchor = os.open(self.base, os.O_RDONLY | os.O_DIRECTORY)
            try:
                syncfs(anchor)
            finally:
                os.close(anchor)
        else:
            for bucket in sorted({target._bucket(m) for m in moved}):
                target._syncers[bucket].sync()
            for bucket in sorted({self._bucket(m) for m in moved}):
                self._syncers[bucket].sync()
        return moved

    def take_in(self, source: Spool, message_id: str, held: bool = False) -> bool:
        """Take another spool's entry as ours (``shardmail adopt``: a dead node's spool, perhaps on
        another file system, with another split): one rename when both lie on one file system,
        else a copy written to tmp/, fsync'd and renamed into place; then our directory made
        durable, and only then the source's name removed. A crash leaves the entry in the source,
        in both (a rerun finds ours and only removes the source's: ids are unique), or in ours;
        the source is served by nobody meanwhile, so a name of its that a crash brings back is only
        removed again. False if the source has no such entry (taken in already)."""
        origin = source.held_path(message_id) if held else Path(source._path(message_id))
        place = self.held_path(message_id) if held else Path(self._path(message_id))
        syncer = self._hold_sync if held else self._syncers[self._bucket(message_id)]
        if not os.path.lexists(origin):
            return False
        if not os.path.lexists(place):
            try:
                os.rename(origin, place)
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
                tmp = f"{self._tmp_s}{message_id}.adopt"
                with open(origin, "rb") as src, open(tmp, "wb") as out:
                    shutil.copyfileobj(src, out, COPY_CHUNK)
                    out.flush()
                    os.fsync(out.fileno())
                os.rename(tmp, place)
        syncer.sync()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(origin)
        return True

    # -- held mail and an admin's delete (ops.queue) --------------------------------------------------
    def held_path(self, message_id: str) -> Path:
        return self.hold_dir / message_id

    def held(self) -> Iterator[str]:
        """Ids of the messages on hold."""
        try:
            yield from os.listdir(self.hold_dir)
        except FileNotFoundError:
            return

    def where(self, message_id: str) -> str | None:
        """"queue", "hold", or None when neither name exists here (no read: see ``peek``)."""
        if os.path.lexists(self._path(message_id)):
            return "queue"
        if os.path.lexists(self._hold_s + message_id):
            return "hold"
        return None

    def hold(self, message_id: str) -> None:
        """queue/ -> hold/, durable (both directories fsync'd). FileNotFoundError if not queued."""
        os.rename(self._path(message_id), self._hold_s + message_id)
        self._hold_sync.sync()
        self._syncers[self._bucket(message_id)].sync()

    def write_held(self, envelope: Envelope, body: bytes) -> Path:
        """Commit a new message straight into hold/ (one moved here while held on its old node:
        it must never be in queue/, where the sweep would ring its bell): tmp/ written and
        fsync'd, renamed into hold/, hold/ fsync'd. Raises OSError, leaving nothing."""
        tmp = f"{self._tmp_s}{envelope.id}"
        place = self._hold_s + envelope.id
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            try:
                faults.check("spool.write")
                _write_all(fd, encode(envelope) + body)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, place)
        except OSError:
            _unlink_quietly(tmp)
            raise
        try:
            self._hold_sync.sync()
        except OSError:
            _unlink_quietly(place)
            raise
        return Path(place)

    def unhold(self, message_id: str) -> None:
        """hold/ -> queue/, durable. FileNotFoundError if not held."""
        held = self._hold_s + message_id
        os.rename(held, self._path(message_id))
        if os.path.lexists(held):  # both names led to one file (rename then does nothing): keep queue/'s
            os.unlink(held)
        self._syncers[self._bucket(message_id)].sync()
        self._hold_sync.sync()

    def peek(self, message_id: str, held: bool = False) -> Envelope:
        """The envelope with its marks, reading the envelope line and what follows the body but not
        the body itself (``size`` says where the marks begin): for listing big queues. Raises as
        ``read`` does."""
        fd = os.open(self._hold_s + message_id if held else self._path(message_id), os.O_RDONLY)
        try:
            head = os.read(fd, 4096)
            while b"\n" not in head:
                more = os.read(fd, 65536)
                if not more:
                    raise EnvelopeError("no envelope line")
                head += more
            line = head[: head.index(b"\n")]
            envelope = decode(line)
            start = len(line) + 1 + envelope.size
            size = os.fstat(fd).st_size
            if size < start:
                raise EnvelopeError(f"body truncated: {size - len(line) - 1} of {envelope.size} bytes")
            tail = os.pread(fd, size - start, start) if size > start else b""
        finally:
            os.close(fd)
        if envelope.id != message_id:
            raise Recycled(errno.ENOENT, f"spool entry {message_id} now holds {envelope.id}")
        return envelope.with_marks(decode_marks(tail))

    def find(self, message_id: str) -> Entry | None:
        """The entry of this id, queued or held, read as ``peek`` does (no body); None when neither
        name exists (or it went while we looked); with ``error`` set when it cannot be read."""
        where = self.where(message_id)
        if where is None:
            return None
        held = where == "hold"
        path = self._hold_s + message_id if held else self._path(message_id)
        try:
            return Entry(message_id, self.shard, self.peek(message_id, held=held), held, "", path)
        except FileNotFoundError:
            return None
        except (EnvelopeError, OSError, UnicodeDecodeError) as exc:
            return Entry(message_id, self.shard, None, held, str(exc), path)

    def entries(self, held: bool = False) -> Iterator[Entry]:
        """Every readable entry, queued (or ``held``), read as ``peek`` does (no body), in directory
        order: for listing big queues. One gone meanwhile (or recycled) or unreadable is skipped
        (the sweep moves it aside and reports it)."""
        for message_id in self.held() if held else self.ids():
            try:
                envelope = self.peek(message_id, held=held)
            except (EnvelopeError, OSError, UnicodeDecodeError):  # FileNotFoundError (Recycled) too
                continue
            yield Entry(message_id, self.shard, envelope, held, "",
                        self._hold_s + message_id if held else self._path(message_id))

    def discard(self, message_id: str, held: bool = False) -> None:
        """Delete an entry for good (an admin's delete): unlink, then the directory fsync'd, so it
        does not come back after a crash. FileNotFoundError if it is not there."""
        if held:
            os.unlink(self._hold_s + message_id)
            self._hold_sync.sync()
        else:
            os.unlink(self._path(message_id))
            self._syncers[self._bucket(message_id)].sync()

    def quarantine(self, message_id: str) -> Path:
        """Move an undecodable entry aside, out of the queue but kept for a human."""
        target = self.corrupt / message_id
        os.rename(self.path(message_id), target)
        return target

    def ids(self) -> Iterator[str]:
        for i in range(self.split):
            try:
                names = os.listdir(self.queue / str(i))
            except FileNotFoundError:
                continue
            yield from names

    def count(self) -> int:
        return sum(1 for _ in self.ids())

    # -- listings for the ops views (ops.depth, ops.qshape) --------------------------------------------
    def census(self, listings: Listings | None = None) -> Counts:
        """Entries, held entries and the oldest entry, from directory listings only (never a file
        read); ``listings`` remembers them, so an unchanged directory costs a stat."""
        listings = listings or Listings()
        spooled, oldest = 0, None
        for directory in self._queue_s:
            listing = listings.take(directory)
            spooled += listing.count
            if listing.oldest is not None and (oldest is None or listing.oldest < oldest):
                oldest = listing.oldest
        return Counts(spooled, listings.take(self._hold_s).count, oldest)

    def queue_dirs(self) -> list[str]:
        """The committed entries' directories (one per split), for ``heads``: a reader shares them
        out among processes."""
        return list(self._queue_s)

    def scan(self) -> Iterator[Entry]:
        """Every committed entry; corrupt ones are yielded with ``error`` set, never raised."""
        for message_id in self.ids():
            path = self._path(message_id)
            try:
                envelope = self.read(message_id)
            except Recycled as exc:
                if os.path.exists(path):  # not recycled meanwhile: a stale name (see the crash notes)
                    yield Entry(message_id, self.shard, None, False, str(exc), path)
                continue
            except FileNotFoundError:
                continue  # delivered and removed while we looked
            except (EnvelopeError, OSError, UnicodeDecodeError) as exc:
                yield Entry(message_id, self.shard, None, False, str(exc), path)
                continue
            yield Entry(message_id, self.shard, envelope, False, "", path)

    def leftovers(self, now: float | None = None) -> Iterator[Leftover]:
        now = time.time() if now is None else now
        for name in os.listdir(self.tmp):
            path = self.tmp / name
            try:
                age = now - path.stat().st_mtime
            except FileNotFoundError:
                continue
            yield Leftover(path, age, self.path(name).exists())


def heads(directory: str) -> Iterator[tuple[dict, bytes]]:
    """Every entry of one of ``queue_dirs``: its envelope line as decoded JSON (core.envelope's
    fields) and its mark lines, the body never read (the envelope's ``size`` says where the marks
    begin). Read with O_NOATIME where allowed (the files' owner, or root), so a look at a big queue
    dirties no inode. Entries gone, recycled, truncated, unreadable or of another format are
    skipped (the sweep reports them)."""
    try:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return
    flags = os.O_RDONLY | NOATIME
    try:
        for name in os.listdir(dir_fd):
            try:
                found = _head_and_marks(dir_fd, name, flags)
            except FileNotFoundError:
                continue  # delivered and removed meanwhile
            except PermissionError:
                if not flags & NOATIME:
                    continue
                flags = os.O_RDONLY  # not the files' owner: atimes then move, as with any reader
                try:
                    found = _head_and_marks(dir_fd, name, flags)
                except OSError:
                    continue
            except OSError:
                continue
            if found is not None:
                yield found
    finally:
        os.close(dir_fd)


def _head_and_marks(dir_fd: int, name: str, flags: int = os.O_RDONLY) -> tuple[dict, bytes] | None:
    """The envelope (as decoded JSON) and the mark lines of one entry, without reading its body:
    the first ``HEAD`` bytes, then (when the body is longer) reads from the end of the body on.
    None for an entry that is gone, recycled, truncated or not an envelope."""
    fd = os.open(name, flags, dir_fd=dir_fd)  # FileNotFoundError, PermissionError: for the caller
    try:
        head = os.read(fd, HEAD)
        newline = head.find(b"\n")
        if newline < 0:
            if len(head) < HEAD:
                return None
            head += os.pread(fd, 1 << 20, HEAD)  # a very long recipient list
            newline = head.find(b"\n")
            if newline < 0:
                return None
        doc = _DECODER.decode(head[:newline].decode("utf-8"))
        if not isinstance(doc, dict) or doc.get("v") != FORMAT_VERSION or doc.get("id") != name:
            return None  # another format, or a recycled file now holding another message
        end = newline + 1 + int(doc["size"])  # where the marks start
        if len(head) >= end:
            blob = head[end:]
            if len(head) < HEAD:
                return doc, blob
            offset = len(head)
        else:
            tail = os.pread(fd, CHUNK, end - 1)  # from the body's last byte: none means truncated
            if not tail:
                return None
            blob, offset = tail[1:], end - 1 + len(tail)
            if len(tail) < CHUNK:
                return doc, blob
        chunks = [blob]
        while True:
            more = os.pread(fd, CHUNK, offset)
            chunks.append(more)
            offset += len(more)
            if len(more) < CHUNK:
                return doc, b"".join(chunks)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError, OSError):
        return None
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a directory's entries durable (after a create, rename or unlink in it)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _load_syncfs() -> Callable[[int], int] | None:
    """libc's syncfs, where it reports write-back errors (Linux >= 5.8); None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        major, minor = (int(part) for part in os.uname().release.split("-")[0].split(".")[:2])
        if (major, minor) < (5, 8):
            return None
        function = ctypes.CDLL(None, use_errno=True).syncfs
    except (ValueError, OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int]
    function.restype = ctypes.c_int
    return function


_syncfs = _load_syncfs()
SYNCFS = _syncfs is not None


def write_batches(batches: list[tuple[Spool, list[tuple[Envelope, bytes]]]]) -> list[list[OSError | None]]:
    """``write_batch`` for several shards' batches at once, per batch the same answer: the shards
    on one file system share the two syncs (one after all the writes, one after all the renames).
    Ingress picks shards in turn, so a group commit of ten messages spans every shard; with a pair
    of syncs per shard, four shards made a commit take about 12 ms here instead of 3."""
    results: list[list[OSError | None]] = [[None] * len(items) for _, items in batches]
    by_device: dict[int, list[int]] = {}
    for number, (spool, _) in enumerate(batches):
        by_device.setdefault(spool.device, []).append(number)
    for numbers in by_device.values():
        _write_group([(batches[n][0], batches[n][1], results[n]) for n in numbers])
    return results


@dataclass(slots=True)
class _Open:
    """One file of a group commit, written and still open."""

    spool: Spool
    envelope: Envelope
    errors: list[OSError | None]  # its batch's answers
    index: int
    fd: int


def _write_group(parts: list[tuple[Spool, list[tuple[Envelope, bytes]], list[OSError | None]]]) -> None:
    """Write, sync, rename, sync: the files of several spools on one file system (see the module
    docstring), recording each file's error in its batch's list."""
    written: list[_Open] = []
    for spool, items, errors in parts:
        for index, (envelope, body) in enumerate(items):
            tmp = spool._tmp_s + envelope.id
            try:
                fd, recycled = spool._open_tmp(tmp)
            except OSError as exc:
                errors[index] = exc
                continue
            try:
                faults.check("spool.write")
                data = encode(envelope) + body
                _write_all(fd, data)
                if recycled:
                    syscalls.ftruncate(fd, len(data))
            except OSError as exc:
                errors[index] = exc
                os.close(fd)
                _unlink_quietly(tmp)
                continue
            written.append(_Open(spool, envelope, errors, index, fd))
    faults.crash_point("after_data_write")
    group = len(written) > 1 and SYNCFS
    anchor = written[0].fd if group else -1  # its open predates every write of the group
    if group:
        error = _capture(lambda: syncfs(anchor))
        synced = [error] * len(written)
        for item in written[1:]:
            syscalls.close(item.fd)
    else:
        # One after the other: on a CPU-bound two-core node that beats handing each fsync to a
        # pool (measured: 695 against 455 msg/s); several committer threads give the parallelism.
        synced = [_fsync_and_close(item.fd) for item in written]
    try:
        _commit_renames(written, synced, anchor if group else None)
    finally:
        if group:
            os.close(anchor)
    faults.crash_point("after_commit")


def _commit_renames(written: list[_Open], synced: list[OSError | None], anchor: int | None) -> None:
    buckets: dict[tuple[int, int], list[_Open]] = {}  # (shard, split directory) -> its files
    for item, error in zip(written, synced, strict=True):
        spool, message_id = item.spool, item.envelope.id
        try:
            if error is not None:
                raise error
            syscalls.rename(spool._tmp_s + message_id, spool._path(message_id))
            buckets.setdefault((spool.shard, spool._bucket(message_id)), []).append(item)
        except OSError as exc:
            item.errors[item.index] = exc
            _unlink_quietly(spool._tmp_s + message_id)
    faults.crash_point("after_rename")
    shared = _capture(lambda: syncfs(anchor)) if anchor is not None and buckets else None
    for (_, bucket), items in buckets.items():
        error = shared if anchor is not None else _capture(items[0].spool._syncers[bucket].sync)
        if error is not None:
            # Not durable: undo, so that a 4xx never leaves a message that is delivered later.
            for item in items:
                item.errors[item.index] = error
                _unlink_quietly(item.spool._path(item.envelope.id))


def syncfs(fd: int) -> None:
    """Make every write on ``fd``'s file system durable: file data, inodes and directories, with one
    device cache flush (ctypes releases the GIL meanwhile). Reports any write-back error on that
    file system since ``fd`` was opened. Raises OSError (also when syncfs is not available)."""
    if _syncfs is None:
        raise OSError(errno.ENOSYS, "syncfs is not available")
    if _syncfs(fd) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def _parse(data: bytes) -> tuple[Envelope, int, bytes]:
    newline = data.find(b"\n")
    if newline < 0:
        raise EnvelopeError("no envelope line")
    envelope = decode(data[:newline])
    offset = newline + 1
    end = offset + envelope.size
    if len(data) < end:
        raise EnvelopeError(f"body truncated: {len(data) - offset} of {envelope.size} bytes")
    return envelope.with_marks(decode_marks(data[end:])), offset, data


def _capture(func: Callable[[], None]) -> OSError | None:
    try:
        func()
    except OSError as exc:
        return exc
    return None


def _fsync_and_close(fd: int) -> OSError | None:
    try:
        return _capture(lambda: os.fsync(fd))
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    """All of ``data`` (core.syscalls' write: the interpreter lock stays held)."""
    while data:
        data = data[syscalls.write(fd, data):]


def _unlink_quietly(path: str | Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
