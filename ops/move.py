"""``shardmail queue move`` and ``shards move``: queued mail handed to another node over QMQP.

Interface: ``find_target(settings, shared, node, qmqp=None) -> Target`` (the node's QMQP listener,
from the cluster's registry or given); ``Mover(settings, conn, target, ...)`` with
``move_ids(ids)`` and ``move_shard(shard)``, each returning a ``MoveReport`` (``status()``, the
exit status, and ``summary()``, the closing line); ``parse_shard(text, node)`` for
``<node>/s<N>``; ``MoveRefused`` (with the exit status) and ``MoveBusy``.

Mail moves through the front door, as DESIGN §4 has it: each message's remaining recipients (not
yet delivered or failed) go to the target's ``shardmail qmqpd`` with the original sender and body,
and only after its ``K`` (said once the target's copy is durable) does the entry leave this spool,
its jobs and claims dropped from Redis as ``queue delete`` drops them. The body goes with one line
on top, ``X-Shardmail-Move: node= id= birth= [hold=yes]``, which the target takes off
(ingress.qmqpd): the message keeps its birth there (retry times and lifetime go on) and held mail
is committed into the target's hold/ (no job, no delivery until ``queue release``).

While a message is being moved it is *on hold* here (ops.queue ``take_out``, what ``queue hold``
does: doorbells dropped, an attempt in flight waited for, up to ``wait`` seconds, then the entry
renamed into hold/), so this node's pools, retries, sweeps and bounces leave it alone; a message
whose attempt is still in flight after that is left where it is (a shard move passes such mail
by at first and waits for each at the end, so one slow attempt does not hold up the rest). A
``Z`` or ``D`` puts it back as it was (``restore``: queued again with its doorbells, or still
held). A message with a bounce due (a failed recipient the scheduler has not reported yet) is
left for its bounce; one with nothing left to deliver is removed. ``shards move`` first marks
the shard draining (ingress stops choosing it; after a fresh mark, ``DRAIN_SETTLE`` seconds for
every ingress process to see it), then moves every entry of it, queued, deferred and held, and
lists it again until nothing new turns up; the shard stays draining (``shards open`` reopens it).

The journal, ``<spool root>/move.journal``: one JSON line per step. Per message: "sending" (with
whether it was held, and the target; fdatasync'd before the hold) → hold → QMQP → "sent" (with
the target's new id; fdatasync'd before the removal) → entry and jobs removed (durably) → "done"
("back" instead when it was put back). A run first finishes what the journal leaves open:
"sending" is handed over again (the only step where a copy could be doubled: the target's ``K``
was in flight when the mover died; the target's qmqpd remembers for a day which node and id it
took in, and answers such a repeat with the same ``K`` instead of a second copy), "sent" only
has its entry removed; the journal goes once
nothing in it is open. A crash point ``move.<step>`` (core.faults) follows each step: sending,
held, accepted, sent, removed, done. ``parallel`` messages (8) are handed over at once, each
on its own thread through these steps, so that the target's group commit takes several per sync
(a crash may then find up to that many with a ``K`` in flight: still one copy too many at most
for each). One mover at a time per node (``move.lock``, else ``MoveBusy``).

Failures: ``MoveRefused``: this node as target (64), an unknown node or one without a QMQP
listener (69), a dead one (75). Per message: ``Z`` (or no connection) puts it back, counted
"left" (temporary; after ``GIVE_UP`` of them in a row the run stops and leaves the rest); ``D``
puts it back, "refused"; no verdict once the request went out (core.qmqp's ``unsure``: the
target may have queued it) keeps it held with its "sending" open, "left", for the rerun to ask
again rather than let this node deliver a second copy. redis.RedisError and OSError propagate:
what was done is in the journal, and running the same command again finishes it.

Settings: ``node``, ``nodedeadafter`` (through core.nodes), the spool root and shards (core.shards),
``redis_prefix``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TextIO

import redis

from core import faults
from core.config import Settings
from core.envelope import valid_id
from core.nodes import Registry
from core.outcome import EX_OK, EX_TEMPFAIL, EX_USAGE
from core.qmqp import Reply, pack, send
from core.shards import LABEL_PATTERN, ShardMap
from core.spool import Entry, fsync_dir
from core.verp import qmail_spelling
from ops.queue import EX_NOTFOUND, QueueAdmin

log = logging.getLogger("shardmail.move")
EX_UNAVAILABLE = 69
JOURNAL = "move.journal"  # in the spool root
LOCK = "move.lock"
DRAIN_SETTLE = 2.0  # s after a fresh drain mark: ingress processes look at the markers once a second
GIVE_UP = 5  # temporary failures in a row after which the target is taken for down and the run stops
OPEN = ("sending", "sent")  # journal states of a move not finished
PARALLEL = 8  # messages handed over at once (the target commits them together)


class MoveRefused(Exception):
    """The move cannot start (the message says why; ``status`` is the exit status)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class MoveBusy(Exception):
    """Another mover runs on this node."""


@dataclass(frozen=True, slots=True)
class Target:
    node: str
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.node} ({host}:{self.port})"


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise MoveRefused(f"--qmqp {text!r}: give HOST:PORT", EX_USAGE)
    return host.strip("[]"), int(port)


def find_target(settings: Settings, shared: redis.Redis, node: str, qmqp: str | None = None) -> Target:
    """Where ``node`` takes mail by QMQP: ``qmqp`` when given, else its heartbeat's listener (it
    must be alive and announce one). MoveRefused otherwise; redis.RedisError propagates."""
    if node == settings.node:
        raise MoveRefused(f"{node} is this node: move mail to another one", EX_USAGE)
    if qmqp:
        return Target(node, *_host_port(qmqp))
    now = time.time()
    record = next((r for r in Registry.of(settings, shared).nodes(now) if r.name == node), None)
    if record is None:
        raise MoveRefused(f"no node {node!r} in the cluster's registry (`shardmail status --cluster` lists them)",
                          EX_UNAVAILABLE)
    if not record.alive:
        raise MoveRefused(f"node {node!r} is dead (last heartbeat {now - record.beat:.0f} s ago): start it, or "
                          f"move the mail elsewhere", EX_TEMPFAIL)
    address = record.qmqp_address()
    if address is None:
        raise MoveRefused(f"node {node!r} announces no QMQP listener: set qmqp_listen there (and qmqpclients "
                          f"to let this node in), or give --qmqp HOST:PORT", EX_UNAVAILABLE)
    return Target(node, *address)


def parse_shard(text: str, node: str) -> int:
    """``<node>/s<N>`` (or ``s<N>``, ``N``) as a shard of this node; ValueError says why not."""
    owner, _, label = text.rpartition("/")
    if owner and owner != node:
        raise ValueError(f"{text} is a shard of node {owner}, and this is {node}: run the move there")
    match = re.fullmatch(LABEL_PATTERN, label) or re.fullmatch(r"(\d+)", label)
    if match is None:
        raise ValueError(f"{text!r} names no shard: give <node>/s<N>")
    return int(match.group(1))


@dataclass
class MoveReport:
    moved: int = 0
    left: int = 0  # temporary: a rerun may move them
    refused: int = 0  # the target said D
    missing: int = 0  # ids named that are in no shard
    removed: int = 0  # entries with nothing left to deliver, removed rather than moved
    finished: int = 0  # moves of an interrupted run completed
    stopped: bool = False  # the target kept failing: the rest was left untouched

    def status(self) -> int:
        if self.left:
            return EX_TEMPFAIL
        return EX_NOTFOUND if self.refused or self.missing else EX_OK

    def summary(self, target: Target) -> str:
        line = f"move to {target.node}: moved {self.moved}, left {self.left} (temporary), refused {self.refused}"
        extras = [f"{self.finished} of them finishing an interrupted move"] if self.finished else []
        extras += [f"{self.removed} removed with nothing left to deliver"] if self.removed else []
        extras += [f"{self.missing} not found"] if self.missing else []
        extras += ["stopped: the target kept answering temporary failures"] if self.stopped else []
        return line + (f"; {'; '.join(extras)}" if extras else "")


@dataclass
class Journal:
    """``<spool root>/move.journal``: per message its latest step, appended durably."""

    root: Path
    states: dict[str, dict[str, object]] = field(default_factory=dict)
    _fd: int = -1
    _lock: int = -1
    _mutex: threading.Lock = field(default_factory=threading.Lock)  # the movers' threads append in turn

    def open(self) -> None:
        self._lock = os.open(self.root / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock)
            raise MoveBusy("another move is running on this node: wait for it, or stop it first") from None
        path = self.root / JOURNAL
        created = not path.exists()
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        if created:
            fsync_dir(self.root)
        data = path.read_bytes()
        for line in data.split(b"\n"):
            try:
                record = json.loads(line)
            except ValueError:
                continue  # the torn last line of a crash mid-append: its step did not happen
            if isinstance(record, dict) and isinstance(record.get("id"), str):
                self.states[record["id"]] = {**self.states.get(record["id"], {}), **record}
        if data and not data.endswith(b"\n"):
            os.write(self._fd, b"\n")  # the torn line must not swallow the next record

    def write(self, message_id: str, state: str, **fields: object) -> None:
        """Append a step; durable before returning when it opens one ("sending", "sent"). A closing
        one ("done", "back") that a crash loses leaves its message open, and the rerun finds
        nothing more to do for it, or moves it once more from where it is."""
        record = {"id": message_id, "state": state, **fields, "at": round(time.time(), 3)}
        line = json.dumps(record, separators=(",", ":")).encode() + b"\n"
        with self._mutex:
            os.write(self._fd, line)
            if state in OPEN:
                os.fdatasync(self._fd)
            self.states[message_id] = {**self.states.get(message_id, {}), **record}

    def unfinished(self) -> list[dict[str, object]]:
        return [r for r in self.states.values() if r.get("state") in OPEN]

    def close(self) -> None:
        """Drop the journal once nothing in it is open (durably: the next run starts afresh)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            if not self.unfinished():
                with contextlib.suppress(FileNotFoundError):
                    (self.root / JOURNAL).unlink()
                    fsync_dir(self.root)
        if self._lock >= 0:
            os.close(self._lock)
            self._lock = -1


class Mover:
    def __init__(self, settings: Settings, conn: redis.Redis, target: Target, *, shared: redis.Redis | None = None,
                 timeout: float = 30.0, wait: float = 10.0, out: TextIO = sys.stdout, err: TextIO = sys.stderr,
                 each: bool = True, parallel: int = PARALLEL, progress: Callable[[int], None] | None = None) -> None:
        self.settings = settings
        self.target = target
        self.shared = shared or conn
        self.admin = QueueAdmin(settings, conn, out, err)
        assert self.admin.jobs is not None
        self.jobs = self.admin.jobs
        self.map: ShardMap = self.admin.map
        self.timeout = timeout
        self.wait = wait
        self.parallel = max(1, parallel)
        self.out = out
        self.err = err
        self.each = each  # a line for every message moved (else only for those left or refused)
        self.progress = progress or (lambda _count: None)
        self.journal = Journal(settings.spool_root)
        self.report = MoveReport()
        self._failures = 0  # temporary failures in a row
        self._later: list[str] | None = None  # a shard's first passes: ids in flight, for a last pass
        self._lock = threading.Lock()  # the report, the output and the failure count, among threads

    # -- the two commands ---------------------------------------------------------------------------
    def move_ids(self, ids: Iterable[str]) -> MoveReport:
        with self._journal():
            self._each(ids, self._move_id)
        return self.report

    def move_shard(self, shard: int) -> MoveReport:
        if shard not in self.map.ids(fresh=True):
            raise MoveRefused(f"no such shard: {shard}", EX_USAGE)
        with self._journal():
            if self.map.drain(shard):
                time.sleep(DRAIN_SETTLE)  # every ingress process sees the mark within a second
            spool = self.map.spool(shard)
            seen: set[str] = set()
            self._later = []  # mail being delivered is passed by at first, and waited for at the end
            while True:
                fresh = [i for i in (*spool.ids(), *spool.held()) if valid_id(i) and i not in seen]
                if not fresh:
                    break
                seen.update(fresh)
                self._each(fresh, partial(self._move_found, spool.find))
            later, self._later = self._later, None
            self._each(later, partial(self._move_found, spool.find), counted=False)
        return self.report

    def _move_id(self, message_id: str) -> None:
        if self._stopped(message_id):
            return
        record = self.journal.states.get(message_id)
        found = self.admin.locate(message_id)
        if found is None and record is not None and record.get("state") == "done":
            self._say(f"{message_id}: moved to {record.get('to')} already"
                      + (f" as {record['new']}" if record.get("new") else ""))
        elif found is None:
            self._add("missing")
            self._warn(f"{message_id}: no such message in the queue")
        else:
            self._move(found)

    def _move_found(self, find: Callable[[str], Entry | None], message_id: str) -> None:
        if self._stopped(message_id):
            return
        found = find(message_id)
        if found is not None and found.envelope is None:
            self._left(message_id, f"unreadable spool entry ({found.error})")
        elif found is not None:
            self._move(found)

    def _each(self, items: Iterable[str], work: Callable[[str], None], counted: bool = True) -> None:
        """``work`` for every item, ``parallel`` at a time (the target's group commit then takes
        several messages per sync); the first exception stops new work and is raised once the
        work under way has ended (each message is in a state the journal describes)."""
        failures: list[BaseException] = []
        with ThreadPoolExecutor(self.parallel, thread_name_prefix="move") as pool:
            running: set[Future[None]] = set()
            for item in items:
                if len(running) >= 2 * self.parallel:
                    done, running = wait(running, return_when=FIRST_COMPLETED)
                    self._ended(done, failures, counted)
                if failures:
                    break
                running.add(pool.submit(work, item))
            self._ended(wait(running).done, failures, counted)
        if failures:
            raise failures[0]

    def _ended(self, done: Iterable[Future[None]], failures: list[BaseException], counted: bool) -> None:
        for future in done:
            if future.exception() is not None:
                failures.append(future.exception())  # type: ignore[arg-type]
            elif counted:
                self.progress(1)

    @contextlib.contextmanager
    def _journal(self) -> Iterator[None]:
        self.journal.open()
        try:
            self._replay()
            yield
        finally:
            self.journal.close()

    def _stopped(self, message_id: str) -> bool:
        """Whether to pass this message by: an interrupted move of it that could not be finished
        (reported already), or the target down (GIVE_UP temporary failures in a row): then the rest
        stays untouched."""
        if self.journal.states.get(message_id, {}).get("state") in OPEN:
            return True
        if self._failures < GIVE_UP:
            return False
        self.report.stopped = True
        self._add("left")
        return True

    # -- one message --------------------------------------------------------------------------------
    def _move(self, found: Entry) -> None:
        envelope = found.read
        if envelope.unreported():
            self._left(found.id, "a bounce is due for a failed recipient; move it once the scheduler has sent it"
                       + (" (it is on hold: release it first)" if found.held else ""))
            return
        self.journal.write(found.id, "sending", shard=found.shard, held=found.held, to=self.target.node)
        faults.crash_point("move.sending")
        self._hand_over(found.id, found.shard, found.held, self.target)

    def _hand_over(self, message_id: str, shard: int, was_held: bool, target: Target) -> None:
        """From "sending" on: take the message out of delivery, hand it to ``target``, remove it."""
        spool = self.map.spool(shard)
        found = spool.find(message_id)
        if found is not None and found.envelope is None:
            self.journal.write(message_id, "back")
            self._left(message_id, f"unreadable spool entry ({found.error})")
            return
        if found is None:
            self.journal.write(message_id, "done", gone=True)
            self._warn(f"{message_id}: left the queue meanwhile (delivered or deleted): nothing to move")
            return
        if not found.held:
            taken = self.admin.take_out(found, wait=0 if self._later is not None else self.wait)
            if taken.state == "busy" and self._later is not None:
                self.journal.write(message_id, "back")
                self._later.append(message_id)
                return
            if taken.state == "busy":
                self.journal.write(message_id, "back")
                self._left(message_id, f"a delivery attempt is in flight ({', '.join(sorted(taken.live))})")
                return
            if taken.state == "gone":
                self.journal.write(message_id, "done", gone=True)
                self._warn(f"{message_id}: left the queue meanwhile (delivered or deleted): nothing to move")
                return
        faults.crash_point("move.held")
        try:
            envelope, body = spool.load(message_id, held=True)
        except FileNotFoundError:
            self.journal.write(message_id, "back")
            self._left(message_id, "released from hold while it was being moved")
            return
        held = Entry(message_id, shard, envelope, True)
        if envelope.unreported():  # the attempt it waited for failed a recipient
            self._put_back(held, was_held)
            self._left(message_id, "a bounce is due for a failed recipient; move it once the scheduler has sent it")
            return
        pending = envelope.pending()
        if not pending:
            self._remove(shard, message_id)
            self.journal.write(message_id, "done", removed=True)
            self._add("removed")
            return
        line = f"X-Shardmail-Move: node={self.settings.node} id={message_id} birth={envelope.birth!r}"
        sender = envelope.sender  # VERP crosses QMQP in qmail's spelling (delimiters x= only)
        if envelope.verp:
            sender = qmail_spelling(envelope.sender, envelope.verp) or sender
        request = pack((line + (" hold=yes" if was_held else "") + "\r\n").encode() + body, sender,
                       [envelope.recipients[i].address for i in pending])
        reply = send(target.host, target.port, request, self.timeout)
        if not reply.accepted:
            self._refused(held, was_held, target, reply)
            return
        faults.crash_point("move.accepted")
        with self._lock:
            self._failures = 0
        new_id = reply.text.split()[-1] if reply.text.strip() else ""
        self.journal.write(message_id, "sent", new=new_id)
        faults.crash_point("move.sent")
        self._remove(shard, message_id)
        faults.crash_point("move.removed")
        self.journal.write(message_id, "done")
        faults.crash_point("move.done")
        self._add("moved")
        log.info("%s: moved to %s as %s (%d recipients%s)", message_id, target, new_id, len(pending),
                 ", on hold" if was_held else "")
        if self.each:
            self._say(f"{message_id}: moved to {target.node} as {new_id or '?'} ({len(pending)} recipient(s)"
                      f"{', on hold' if was_held else ''})")

    def _refused(self, held: Entry, was_held: bool, target: Target, reply: Reply) -> None:
        if reply.unsure:  # it may be queued there: kept on hold here, its "sending" open for the rerun
            with self._lock:
                self._failures += 1
            self._left(held.id, f"no verdict from {target.node} once it was sent ({reply.text})",
                       f"it is on hold until the same command is run again, which asks {target.node} again (a "
                       f"message it took is recognised, not queued twice)")
            return
        self._put_back(held, was_held)
        if reply.permanent:
            self._add("refused")
            self._warn(f"{held.id}: refused by {target.node}: {reply.text}; it stays here")
            return
        with self._lock:
            self._failures += 1
        self._left(held.id, f"{target.node} answered: {reply.text}")

    def _put_back(self, held: Entry, was_held: bool) -> None:
        """Back as it was before the move began: queued with its doorbells, or held."""
        if not was_held:
            with contextlib.suppress(FileNotFoundError):  # released meanwhile
                self.admin.restore(held)
        self.journal.write(held.id, "back")

    def _remove(self, shard: int, message_id: str) -> None:
        """The source entry and its doorbells go, as ``queue delete`` does it."""
        spool = self.map.spool(shard)
        where = spool.where(message_id)
        if where is not None:
            with contextlib.suppress(FileNotFoundError):
                spool.discard(message_id, held=where == "hold")
        self.jobs.forget(shard, message_id, time.time())

    # -- an interrupted run -------------------------------------------------------------------------
    def _replay(self) -> None:
        for record in self.journal.unfinished():
            message_id, shard = str(record["id"]), int(str(record.get("shard", 0)))
            to = str(record.get("to", ""))
            if record["state"] == "sent":
                self._remove(shard, message_id)
                self.journal.write(message_id, "done")
                self._add("moved")
                self._add("finished")
                self._say(f"{message_id}: moved to {to} as {record.get('new') or '?'} (finishing an interrupted move)")
                continue
            try:
                target = self.target if to == self.target.node else find_target(self.settings, self.shared, to)
            except MoveRefused as exc:
                self._add("left")
                self._warn(f"{message_id}: an interrupted move to {to} cannot be finished now ({exc}); it stays "
                           f"on hold here: `shardmail queue move {message_id} --to {to}` finishes it")
                continue
            before = self.report.moved
            self._hand_over(message_id, shard, bool(record.get("held")), target)
            self.report.finished += self.report.moved - before

    # -- output -------------------------------------------------------------------------------------
    def _add(self, name: str, count: int = 1) -> None:
        with self._lock:
            setattr(self.report, name, getattr(self.report, name) + count)

    def _left(self, message_id: str, why: str, where: str = "it stays here") -> None:
        self._add("left")
        self._warn(f"{message_id}: not moved: {why}; {where}")

    def _say(self, text: str) -> None:
        with self._lock:
            self.out.write(text + "\n")
            self.out.flush()

    def _warn(self, text: str) -> None:
        with self._lock:
            self.err.write(f"shardmail move: {text}\n")
            self.err.flush()
