"""``shardmail queue``: look at and act on queued mail, message by message (postqueue/postsuper for shards).

Interface: ``QueueAdmin(settings, conn, out, err)`` (``conn`` None when Redis is down) with
``listing(filter, as_json, limit)``, ``show(ids, body)``, ``hold(ids, force, wait)``, ``release(ids)``,
``requeue(ids)``, ``delete(ids)``, ``delete_all(filter)``, ``flush(filter)``, each returning the
exit status; for ops.move ``take_out(entry, force, wait) -> TakeOut`` (what ``hold`` does to one
message) and ``restore(entry)`` (its undoing, as ``release``); ``Filter`` (shards, held only,
recipient domain), ``parse_ids(words, stdin)``; ``message_doc``, ``render_message``,
``summary_line`` (one listed message as JSON and as text, and the closing line: ops.cluster_spool
shows other nodes' listings with them).

The spool is the truth and Redis only rings the bell, so every command starts from the spool
entry and treats Redis as something to tidy: a job whose entry is gone (held, deleted) ends
harmlessly wherever it turns up (the pools finish it, the scheduler's settle calls it "gone").
Ids are unique per node and say nothing about their shard, so a message is looked for in each
shard of the shard map (``Spool.where``: two stats each, queued and held).

- ``list`` reads each entry's envelope line and marks, never its body (core.spool's ``peek``); it
  streams shard by shard in directory order, so it stays flat on big queues (``--limit N``: the
  first N, and the JSON says ``truncated``; ``--cluster``: every node's, ops.cluster_spool). Held messages are
  flagged ``!``, messages with a delivery in flight ``*`` (from the started registries, when
  Redis answers). The first word of each message line is its id, so its output can be piped into
  the other commands with ``-``.
- ``hold`` renames the entry into hold/ (durable) and drops its doorbells: queued jobs, retry-set
  and failed-registry entries (one script per channel, which also reports a claim in flight). A
  message with a delivery in flight is held when that attempt ends: the command waits up to
  ``--wait`` seconds, and otherwise refuses (exit 75, nothing changed); ``--force`` holds it at
  once, and then the attempt's outcome is not recorded (its checkpoint finds no file), so its
  recipients may get that copy once more after release (local Maildir copies are recognised by
  name). After the rename it looks once more for a claim taken meanwhile, and if there is one,
  renames the entry back and waits again: a claim is recorded before its worker reads the file.
- Lifetime: hold stops the clock of nothing. Expiry is judged only after an attempt (a deferral
  at or after ``birth + queuelifetime`` fails, scheduler.retry), so mail released after its
  lifetime gets one normal attempt at once, and bounces only if that attempt defers too.
- ``release`` renames it back and rings its doorbells at once: a job per channel with pending
  recipients (none for a channel with a claim in flight); an entry with nothing left to deliver
  (all failed or bounced) gets a settle entry instead, so the scheduler bounces or removes it.
- ``requeue`` rebuilds the doorbells the same way for a queued message (stale jobs, failed jobs,
  retry entries and abandoned claims dropped first; a claim in flight is left alone); for a
  held message it releases it (as ``postsuper -r`` does).
- ``delete`` unlinks the entry (durably), then drops its doorbells; an attempt in flight ends with
  a checkpoint that finds nothing. One line per message (id, shard, sender, pending recipients)
  is logged and printed. ``delete ALL`` needs ``--all`` and takes the list filters.
- ``flush`` brings deferred mail forward: retry-set entries rescored to now (only lowered), so the
  scheduler's next pass releases them; with ``--domain`` only the entries of channels that have
  a pending recipient in that domain (their envelopes are read).

Exit status: 0 done; 1 a message not found (the others are still done); 64 usage; 75 Redis
unavailable or a refusal (see below), with the spool left consistent:
``list``/``show`` need no Redis; ``hold`` refuses without it (it cannot see attempts in flight)
unless ``--force``; ``release`` renames anyway and exits 75 (the scheduler's next sweep rings the
bell instead); ``delete`` deletes anyway and exits 0 (the doorbells left behind end harmlessly);
``requeue`` and ``flush`` change nothing and exit 75.

Failures: a disk error on one message is reported for it (exit 75) and the others go on.
Settings: ``shards`` (through core.shards), ``redis_prefix``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any, Literal, TextIO

import redis

from core.address import domain_of
from core.config import Settings
from core.envelope import Channel, Envelope, Mark, valid_id
from core.jobs import Item, Jobs
from core.outcome import EX_OK, EX_TEMPFAIL
from core.shards import Namespace, ShardMap, shard_label
from core.spool import Entry

log = logging.getLogger("shardmail.queue")
EX_NOTFOUND = 1
WAIT_STEP = 0.1  # s between two looks at an attempt in flight
FLUSH_BATCH = 1000  # retry entries rescored per round trip


@dataclass(frozen=True, slots=True)
class TakeOut:
    """What ``take_out`` did: "held", "busy" (an attempt still in flight: queued as before), or
    "gone" (the message left the queue meanwhile); ``live``: the channels with an attempt in flight."""

    state: Literal["held", "busy", "gone"]
    live: frozenset[Channel] = frozenset()


@dataclass(frozen=True, slots=True)
class Filter:
    """Which messages a listing (or ``delete ALL``, ``flush``) takes."""

    shards: list[int]
    held_only: bool = False
    domain: str = ""

    def matches(self, found: Entry) -> bool:
        if self.held_only and not found.held:
            return False
        return not self.domain or (found.envelope is not None and bool(domain_channels(found.envelope, self.domain)))


def domain_channels(envelope: Envelope, domain: str) -> set[Channel]:
    """Channels with a pending recipient in ``domain`` (compared without case or a trailing dot)."""
    wanted = domain.rstrip(".").lower()
    return {envelope.recipients[i].channel for i in envelope.pending()
            if domain_of(envelope.recipients[i].address) == wanted}


def parse_ids(words: Iterable[str], stdin: TextIO) -> list[str]:
    """The ids named, ``-`` standing for those read from ``stdin``: the first word of each line,
    with a ``!``/``*`` flag stripped, so that ``shardmail queue list`` output can be piped in (its
    recipient and total lines are skipped)."""
    ids: list[str] = []
    for word in words:
        if word != "-":
            ids.append(word.rstrip("!*"))
            continue
        for line in stdin:
            first = line.split(None, 1)[0].rstrip("!*") if line.strip() and not line[0].isspace() else ""
            if valid_id(first):
                ids.append(first)
    return list(dict.fromkeys(ids))


def _when(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))


def _size(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return ""


def waiting(envelope: Envelope) -> list[int]:
    """Recipients still to be settled: pending ones, and failed ones whose bounce is due."""
    return [i for i, mark in enumerate(envelope.states()) if mark is None or mark.state not in ("delivered", "bounced")]


def _recipient(envelope: Envelope, index: int, states: list[Mark | None]) -> dict[str, object]:
    mark = states[index]
    recipient = envelope.recipients[index]
    state = "ready" if mark is None or mark.state == "pending" else mark.state
    entry: dict[str, object] = {"address": recipient.address, "channel": recipient.channel, "state": state}
    if mark is not None and mark.state != "pending":
        entry.update(status=mark.status, reason=mark.text, at=mark.at)
    return entry


def message_doc(found: Entry, active: bool) -> dict[str, Any]:
    """A listed message as ``queue list --json`` gives it: its waiting recipients only."""
    envelope = found.read
    states = envelope.states()
    return {"id": envelope.id, "shard": found.shard, "held": found.held, "active": active, "size": envelope.size,
            "arrival": envelope.birth, "sender": envelope.sender,
            "recipients": [_recipient(envelope, i, states) for i in waiting(envelope)]}


def render_message(doc: dict[str, Any], where: str) -> str:
    """A listed message's lines (``where``: its shard, as ``s0`` or, in a cluster, ``mx1/s0``):
    the id flagged ``!`` held or ``*`` in flight, then one line per waiting recipient."""
    flag = "!" if doc["held"] else "*" if doc["active"] else " "
    lines = [f"{doc['id']}{flag} {where:<4} {doc['size']:>9}  {_when(doc['arrival'])}  <{doc['sender']}>"]
    for entry in doc["recipients"]:
        line = f"    <{entry['address']}>  {entry['state']}"
        if entry["state"] == "failed":
            line += " (bounce due)"
        if "status" in entry and entry["state"] != "ready":
            line += f"  {entry['status']} {entry['reason']} (at {_when(float(entry['at']))})"
        lines.append(line)
    return "\n".join(lines) + "\n"


def summary_line(messages: int, size: int, recipients: int, held: int, active: int) -> str:
    return (f"-- {messages} message(s), {_size(size)}, {recipients} recipient(s) waiting; {held} held (!), "
            f"{active} in flight (*)")


@dataclass
class Totals:
    messages: int = 0
    held: int = 0
    active: int = 0
    size: int = 0
    recipients: int = 0


class QueueAdmin:
    def __init__(self, settings: Settings, conn: redis.Redis | None, out: TextIO = sys.stdout,
                 err: TextIO = sys.stderr) -> None:
        self.map = ShardMap(settings)
        self.conn = conn
        self.jobs = Jobs(conn, Namespace.of(settings)) if conn is not None else None
        self.out = out
        self.err = err
        self.missing = 0  # ids asked for that were not found

    # -- finding messages -------------------------------------------------------------------------
    def locate(self, message_id: str) -> Entry | None:
        """The message in whichever shard holds it (queued or held); None if none does. Every entry
        this module hands on (``locate``, ``messages``) was read: its envelope is never None."""
        if not valid_id(message_id):
            return None
        for shard in self.map.ids():
            found = self.map.spool(shard).find(message_id)
            if found is None:
                continue  # not here, or delivered (or moved) while we looked: look on
            if found.envelope is None:
                self._say_err(f"{message_id}: unreadable spool entry in shard {shard}: {found.error}")
                return None
            return found
        return None

    def messages(self, flt: Filter) -> Iterator[Entry]:
        """Every message the filter takes, shard by shard (queued then held), bodies unread."""
        for shard in flt.shards:
            spool = self.map.spool(shard)
            for held in (True,) if flt.held_only else (False, True):
                for found in spool.entries(held):
                    if flt.matches(found):
                        yield found

    def active(self, shards: Iterable[int]) -> set[str]:
        """Ids of messages with a claim in flight (a live lease), from the started registries."""
        return set() if self.jobs is None else self.jobs.in_flight(shards)

    def _each(self, ids: list[str]) -> Iterator[Entry]:
        """The messages named, in order; each unknown one reported (self.missing counts them)."""
        for message_id in ids:
            found = self.locate(message_id)
            if found is None:
                self.missing += 1
                self._say_err(f"{message_id}: no such message in the queue")
                continue
            yield found

    def _say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def _say_err(self, text: str) -> None:
        print(f"shardmail queue: {text}", file=self.err, flush=True)

    def _status(self, worst: int) -> int:
        return worst if worst != EX_OK else (EX_NOTFOUND if self.missing else EX_OK)

    # -- list and show ----------------------------------------------------------------------------
    def listing(self, flt: Filter, as_json: bool = False, limit: int = 0) -> int:
        """Every message the filter takes, or the first ``limit`` of them (0: all); the JSON says
        ``"truncated": true`` when there were more."""
        active: set[str] = set()
        try:
            if self.conn is None:
                raise redis.ConnectionError("no answer")
            active = self.active(flt.shards)
        except redis.RedisError as exc:
            self._say_err(f"Redis unavailable ({exc}): deliveries in flight are not flagged")
        totals = Totals()
        truncated = False
        if as_json:
            self.out.write('{"messages": [')
        for found in self.messages(flt):
            if limit and totals.messages >= limit:
                truncated = True
                break
            doc = message_doc(found, found.read.id in active)
            totals.messages += 1
            totals.held += found.held
            totals.active += doc["active"]
            totals.size += doc["size"]
            totals.recipients += len(doc["recipients"])
            if as_json:
                self.out.write(("\n  " if totals.messages == 1 else ",\n  ") + json.dumps(doc))
            else:
                self.out.write(render_message(doc, shard_label(found.shard)))
        if as_json:
            total = {"messages": totals.messages, "held": totals.held, "active": totals.active,
                     "size": totals.size, "recipients": totals.recipients}
            self.out.write(("\n" if totals.messages else "") + f'], "total": {json.dumps(total)}, '
                           f'"truncated": {json.dumps(truncated)}}}\n')
        elif totals.messages:
            self.out.write(summary_line(totals.messages, totals.size, totals.recipients, totals.held, totals.active)
                           + (f" (the first {limit}: there are more)" if truncated else "") + "\n")
        else:
            self.out.write("-- the queue is empty" + (" (for this selection)\n" if flt.domain or flt.held_only
                                                       or len(flt.shards) < len(self.map.ids()) else "\n"))
        self.out.flush()
        return EX_OK

    def show(self, ids: list[str], body: bool = False) -> int:
        first = True
        for found in self._each(ids):
            envelope = found.read
            try:
                envelope, content = self.map.spool(found.shard).load(envelope.id, held=found.held)
            except FileNotFoundError:
                self.missing += 1
                self._say_err(f"{envelope.id}: left the queue while we looked")
                continue
            if not first:
                self._say("")
            first = False
            client = envelope.client
            lines = [
                f"*** envelope of {envelope.id} (shard {found.shard}, {'on hold' if found.held else 'queued'})",
                f"arrival: {_when(envelope.birth)} ({envelope.birth:.3f})",
                f"size: {envelope.size} bytes",
                f"sender: <{envelope.sender}>",
                f"client: {client.address or '-'} helo={client.helo or '-'} {client.protocol}"
                + (f" user={client.user}" if client.user else "") + (" smtputf8" if envelope.smtputf8 else ""),
                "*** recipients",
            ]
            states = envelope.states()
            for index, recipient in enumerate(envelope.recipients):
                entry = _recipient(envelope, index, states)
                lines.append(f"{index}: <{recipient.address}> via {recipient.channel}: {entry['state']}")
            lines.append("*** marks")
            for mark in envelope.marks:
                address = (envelope.recipients[mark.index].address if 0 <= mark.index < len(envelope.recipients)
                           else f"#{mark.index}")
                lines.append(f"{_when(mark.at)} <{address}> {mark.state} {mark.status} {mark.text}".rstrip())
            if not envelope.marks:
                lines.append("(none: never attempted)")
            end = content.find(b"\r\n\r\n")
            headers = content if end < 0 else content[: end + 2]
            lines.append("*** headers")
            lines.append(headers.decode("utf-8", "replace").replace("\r\n", "\n").rstrip("\n"))
            if body:
                lines.append("*** body")
                lines.append(("" if end < 0 else content[end + 4:].decode("utf-8", "replace"))
                             .replace("\r\n", "\n").rstrip("\n"))
            self._say("\n".join(lines))
        return self._status(EX_OK)

    # -- doorbells --------------------------------------------------------------------------------
    def _drop(self, shard: int, message_id: str) -> dict[Channel, tuple[bool, int]]:
        """Drop every doorbell of the message but a claim in flight: per channel (dropped, claim)."""
        assert self.jobs is not None
        return self.jobs.forget(shard, message_id, time.time())

    def _ring(self, shard: int, envelope: Envelope, live: set[Channel]) -> list[Channel]:
        """Doorbells for a message with none (its old ones dropped): a job now for each channel with
        pending recipients and no attempt in flight; for an entry with nothing left to deliver, a
        settle entry (the scheduler bounces or removes it). Returns the channels given jobs."""
        assert self.jobs is not None
        channels = [c for c in envelope.channels() if c not in live]
        if channels:
            self.jobs.enqueue(Item(shard, envelope.id, c, len(envelope.pending(c))) for c in channels)
        elif not envelope.channels():
            self.jobs.conn.rpush(self.jobs.settle_key(shard), f"{envelope.id}:local")
        return channels

    def _settle_later(self, shard: int, message_id: str, channels: Iterable[Channel]) -> None:
        """Give back doorbells dropped by a hold that did not happen: the scheduler's settle puts
        each channel into the retry set at its computed time."""
        assert self.jobs is not None
        channels = list(channels)
        if channels:
            self.jobs.conn.rpush(self.jobs.settle_key(shard), *(f"{message_id}:{c}" for c in channels))

    # -- hold, release, requeue -------------------------------------------------------------------
    def hold(self, ids: list[str], force: bool = False, wait: float = 10.0) -> int:
        worst = EX_OK
        for found in self._each(ids):
            worst = max(worst, self._hold_one(found, force, wait))
        return self._status(worst)

    def _hold_one(self, found: Entry, force: bool, wait: float) -> int:
        message_id = found.id
        if found.held:
            self._say(f"{message_id}: already on hold")
            return EX_OK
        if self.conn is None and not force:
            self._say_err(f"{message_id}: not held: Redis is unavailable, so an attempt in flight cannot be "
                          "seen (--force holds it anyway)")
            return EX_TEMPFAIL
        try:
            taken = self.take_out(found, force, wait)
        except redis.RedisError as exc:
            where = self.map.spool(found.shard).where(message_id)
            self._say_err(f"{message_id}: Redis failed during the hold ({exc}); "
                          f"it is {'on hold' if where == 'hold' else 'still queued'}")
            return EX_TEMPFAIL
        except OSError as exc:
            self._say_err(f"{message_id}: not held: {exc}")
            return EX_TEMPFAIL
        if taken.state == "busy":
            self._say_err(f"{message_id}: not held: a delivery attempt is in flight ({', '.join(sorted(taken.live))})"
                          f"; try again, wait longer (--wait), or --force")
            return EX_TEMPFAIL
        if taken.state == "gone":
            self.missing += 1
            self._say_err(f"{message_id}: left the queue before it could be held")
            return EX_OK
        live = taken.live
        note = f" (an attempt in flight on {', '.join(sorted(live))}: its outcome is not recorded)" if live else ""
        if self.conn is None:
            note = " (Redis unavailable: its doorbells end harmlessly when they ring)"
        log.info("%s: held (shard %d)%s", message_id, found.shard, note)
        self._say(f"{message_id}: held{note}")
        return EX_OK

    def take_out(self, found: Entry, force: bool = False, wait: float = 10.0) -> TakeOut:
        """Take a queued message out of delivery: its doorbells dropped and its entry renamed into
        hold/ once no attempt is in flight (``hold``, and ``shardmail queue move`` before it hands a
        message on). "busy": an attempt was still in flight after ``wait`` seconds, and the message
        is queued as before (its dropped doorbells given back to the scheduler); "gone": it left the
        queue meanwhile. Raises redis.RedisError and OSError (the entry is then in one of the two
        places, ``Spool.where`` says which)."""
        message_id = found.id
        spool = self.map.spool(found.shard)
        deadline = time.monotonic() + wait
        dropped: set[Channel] = set()
        live: set[Channel] = set()
        while True:
            if self.conn is not None:
                result = self._drop(found.shard, message_id)
                dropped |= {c for c, (gone, _) in result.items() if gone}
                live = {c for c, (_, claim) in result.items() if claim == 1}
            if live and not force:
                if time.monotonic() < deadline:
                    time.sleep(WAIT_STEP)
                    continue
                self._settle_later(found.shard, message_id, dropped - live)
                return TakeOut("busy", frozenset(live))
            try:
                spool.hold(message_id)
            except FileNotFoundError:
                return TakeOut("gone")
            if live or self.conn is None:
                return TakeOut("held", frozenset(live))
            # a claim taken between the drop and the rename may have read the entry before it
            # moved: give it back to that attempt, and hold when the attempt is over
            again = self._drop(found.shard, message_id)
            dropped |= {c for c, (gone, _) in again.items() if gone}
            if not any(claim == 1 for _, claim in again.values()):
                return TakeOut("held")
            spool.unhold(message_id)

    def restore(self, found: Entry) -> list[Channel]:
        """Undo ``take_out``: the held entry back into the queue with doorbells as it had them: a
        job now for a channel never tried, and for one whose recipients were tried (deferred) a
        settle entry, from which the scheduler puts it back at its computed retry time. Returns
        the channels given jobs. Raises FileNotFoundError (not held), OSError, redis.RedisError
        (then the entry is queued, and the sweep rings its bell)."""
        self.map.spool(found.shard).unhold(found.id)
        envelope = found.read
        result = self._drop(found.shard, found.id)
        live = {c for c, (_, claim) in result.items() if claim == 1}
        states = envelope.states()
        tried = {c for c in envelope.channels() if any(states[i] is not None for i in envelope.pending(c))}
        self._settle_later(found.shard, found.id, tried - live)
        return self._ring(found.shard, envelope, live | tried)

    def release(self, ids: list[str]) -> int:
        worst = EX_OK
        for found in self._each(ids):
            if not found.held:
                self._say(f"{found.id}: not on hold")
                continue
            worst = max(worst, self._release_one(found, "released"))
        return self._status(worst)

    def _release_one(self, found: Entry, verb: str) -> int:
        message_id = found.id
        try:
            self.map.spool(found.shard).unhold(message_id)
        except FileNotFoundError:
            self.missing += 1
            self._say_err(f"{message_id}: left hold/ before it could be released")
            return EX_OK
        except OSError as exc:
            self._say_err(f"{message_id}: not released: {exc}")
            return EX_TEMPFAIL
        log.info("%s: %s from hold (shard %d)", message_id, verb, found.shard)
        if self.conn is None:
            self._say(f"{message_id}: {verb}; Redis is unavailable: the scheduler's next sweep queues it")
            return EX_TEMPFAIL
        return self._rebuild(replace(found, held=False), verb)

    def _rebuild(self, found: Entry, verb: str) -> int:
        try:
            result = self._drop(found.shard, found.id)
            live = {c for c, (_, claim) in result.items() if claim == 1}
            channels = self._ring(found.shard, found.read, live)
        except redis.RedisError as exc:
            self._say_err(f"{found.id}: Redis failed ({exc}): the scheduler's next sweep queues it")
            return EX_TEMPFAIL
        parts = [f"queued for {', '.join(channels)}"] if channels else []
        parts += [f"{c} in flight, left alone" for c in sorted(live)]
        if not parts:
            parts = ["nothing left to deliver: handed to the scheduler"]
        self._say(f"{found.id}: {verb} ({'; '.join(parts)})")
        return EX_OK

    def requeue(self, ids: list[str]) -> int:
        if self.conn is None:
            self._say_err("Redis unavailable: nothing requeued")
            return EX_TEMPFAIL
        worst = EX_OK
        for found in self._each(ids):
            if found.held:
                worst = max(worst, self._release_one(found, "released and requeued"))
                continue
            log.info("%s: requeued (shard %d)", found.id, found.shard)
            worst = max(worst, self._rebuild(found, "requeued"))
        return self._status(worst)

    # -- delete -----------------------------------------------------------------------------------
    def delete(self, ids: list[str]) -> int:
        return self._delete(self._each(ids))

    def delete_all(self, flt: Filter) -> int:
        return self._delete(self.messages(flt), summary=True)

    def _delete(self, found_messages: Iterable[Entry], summary: bool = False) -> int:
        worst = EX_OK
        count = 0
        warned = False
        for found in found_messages:
            envelope = found.read
            try:
                self.map.spool(found.shard).discard(envelope.id, held=found.held)
            except FileNotFoundError:
                continue  # gone meanwhile: nothing to delete
            except OSError as exc:
                self._say_err(f"{envelope.id}: not deleted: {exc}")
                worst = EX_TEMPFAIL
                continue
            count += 1
            pending = ", ".join(f"<{envelope.recipients[i].address}>" for i in waiting(envelope)) or "none"
            line = (f"{envelope.id}: deleted (shard {found.shard}{', on hold' if found.held else ''}, "
                    f"from <{envelope.sender}>, recipients pending: {pending})")
            log.info("%s", line)
            self._say(line)
            if self.conn is None:
                if not warned:
                    self._say_err("Redis unavailable: doorbells of deleted messages stay, and end harmlessly")
                    warned = True
                continue
            try:
                self._drop(found.shard, envelope.id)
            except redis.RedisError as exc:
                self._say_err(f"{envelope.id}: its doorbells stay in Redis ({exc}) and end harmlessly")
        if summary:
            self._say(f"-- {count} message(s) deleted")
        return self._status(worst)

    # -- flush ------------------------------------------------------------------------------------
    def flush(self, flt: Filter) -> int:
        if self.conn is None or self.jobs is None:
            self._say_err("Redis unavailable: nothing flushed")
            return EX_TEMPFAIL
        now = time.time()
        brought: set[str] = set()
        try:
            for shard in flt.shards:
                key = self.jobs.retry_key(shard)
                if not flt.domain:
                    while True:
                        members = self.jobs.bring_forward(shard, now, FLUSH_BATCH)
                        brought.update(m for m, _ in members)
                        if len(members) < FLUSH_BATCH:
                            break
                    continue
                wanted = [(found.id, channel) for found in self.messages(Filter([shard], False, flt.domain))
                          if not found.held for channel in domain_channels(found.read, flt.domain)]
                for start in range(0, len(wanted), FLUSH_BATCH):
                    chunk = wanted[start:start + FLUSH_BATCH]
                    with self.conn.pipeline(transaction=False) as pipe:
                        for message_id, channel in chunk:
                            pipe.zadd(key, {f"{message_id}:{channel}": now}, xx=True, lt=True, ch=True)
                        changed = pipe.execute()
                    brought.update(m for (m, _), n in zip(chunk, changed, strict=True) if n)
        except redis.RedisError as exc:
            self._say_err(f"Redis failed ({exc}) after {len(brought)} message(s) were brought forward")
            return EX_TEMPFAIL
        log.info("flush: %d deferred message(s) due now%s", len(brought),
                 f" (domain {flt.domain})" if flt.domain else "")
        self._say(f"{len(brought)} deferred message(s) due now: the scheduler releases them on its next pass")
        return EX_OK
