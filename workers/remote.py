"""Remote delivery: hundreds of SMTP sessions in flight on one asyncio loop, fair to every destination.

Interface: ``RemoteEngine(settings, shard_map, on_done, io, resolver=None)`` with ``add(claim, envelope)``,
``in_memory`` (messages held), ``claims()`` (theirs), ``room`` (an event set while more may be added),
``stop(grace) -> list[Claim]`` (claims to give back to the queue); ``wire_address(address, utf8)``,
``needs_smtputf8(envelope, body)``.

Work is cut into *deliveries*: one message's pending remote recipients for one domain, at most
``remotercptlimit`` of them (one SMTP transaction each), or exactly one when the message asks for
VERP (core.verp: each recipient's MAIL FROM is its own VERP address). A delivery waits in the queue of its
*destination*: the domain, or the relay an ``smtproutes`` entry names (so domains sharing a relay
share its limits and connections). A destination runs at most ``concurrencydestination`` sessions,
the process at most ``concurrencyremote``; when the process is full, destinations wanting a session
take turns (round robin), so one slow or hanging domain can hold at most its own share of sessions
while the others go on at their normal rate. A session keeps its connection for the next delivery
to the same destination, up to ``reusecount`` transactions, and parks it for ``reuseidle`` seconds
when the queue is empty. When every hop of a destination fails (refused, hanging, 4xx greeting),
everything queued for it is deferred at once with that reason, instead of each delivery waiting
for the same timeouts in turn.

Each delivery's outcomes are appended to the spool entry (the per-recipient checkpoint) on the
``io`` thread pool, off the loop, as group commits: the checkpoints that arrive while one flush
runs go together in the next (Spool.mark_many: appends, then one flush); when all of a message's
deliveries are marked and every recipient of every channel is delivered, the entry is removed (one
with a failed recipient waits for its bounce), and then ``on_done(claim)`` lets the caller finish
the job.

Failures: route outcomes from workers.routing (NXDOMAIN, null MX fail; DNS trouble defers), session
outcomes from workers.smtp_client; a spool entry gone meanwhile is a finished job. Deferred
recipients stay pending in the spool with their reason, for the retry scheduler.

Settings: ``concurrencyremote``, ``concurrencydestination``, ``remotercptlimit``, ``reusecount``,
``reuseidle``, ``smtproutes``, plus those of workers.routing and workers.smtp_client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

import dns.asyncresolver

from core import faults, metrics
from core.address import domain_of
from core.config import Settings
from core.envelope import DOUBLE_BOUNCE_SENDER, Envelope, Mark
from core.jobs import Claim
from core.outcome import Deferred, Delivered, Failed, Outcome
from core.shards import ShardMap
from workers.routing import Hop, ascii_domain, make_resolver, route, static_route
from workers.smtp_client import ClientSettings, HopFailure, Peer, Session, StaleSession, open_session, wire_data

log = logging.getLogger("shardmail.remote")
MAX_HOPS = 5  # addresses tried per delivery attempt (Postfix: smtp_mx_address_limit)
ROUTE_TTL = 60.0  # s a destination keeps its resolved hops (dnspython's cache honours the records' TTLs)


def wire_address(address: str, utf8: bool) -> str:
    """The address as it goes into MAIL/RCPT: the domain in IDNA form unless SMTPUTF8 is used."""
    if utf8 or address.isascii():
        return address
    local, at, domain = address.rpartition("@")
    ascii_name = ascii_domain(domain)
    return f"{local}{at}{ascii_name}" if at and ascii_name else address


def needs_smtputf8(envelope: Envelope, body: bytes) -> bool:
    """Only what cannot be written in ASCII needs SMTPUTF8: a non-ASCII local part, or (for a message
    that came in with SMTPUTF8) non-ASCII headers. A non-ASCII domain goes out as IDNA."""
    addresses = [envelope.sender, *(r.address for r in envelope.recipients)]
    if any(not a.rpartition("@")[0].isascii() for a in addresses):
        return True
    if not envelope.smtputf8:
        return False
    end = body.find(b"\r\n\r\n")
    return not (body if end < 0 else body[:end]).isascii()


def _state(outcome: Outcome) -> str:
    if isinstance(outcome, Delivered):
        return "delivered"
    return "deferred" if isinstance(outcome, Deferred) else "failed"


@dataclass(slots=True)
class Message:
    claim: Claim
    envelope: Envelope
    outstanding: int  # deliveries not yet marked
    marks: list[Mark] = field(default_factory=list)
    unsafe: bool = False  # a checkpoint of it failed: it must not leave the spool


@dataclass(slots=True)
class Delivery:
    message: Message
    domain: str
    indexes: list[int]


@dataclass(slots=True)
class Destination:
    key: str
    static: Hop | None
    queue: deque[Delivery] = field(default_factory=deque)
    active: int = 0  # sessions running
    starting: int = 0  # of those, the ones that have not taken their first delivery yet
    idle: list[tuple[Session, asyncio.TimerHandle]] = field(default_factory=list)
    hops: list[Hop] | None = None
    hops_until: float = 0.0
    waiting: bool = False  # in the engine's round robin for a free session


class RemoteEngine:
    def __init__(self, settings: Settings, shard_map: ShardMap, on_done: Callable[[Claim], None], io: Executor,
                 resolver: dns.asyncresolver.Resolver | None = None) -> None:
        self.settings = settings
        self.map = shard_map
        self.on_done = on_done
        self.io = io
        self.resolver = resolver or make_resolver(settings)
        self.client = ClientSettings.from_settings(settings)
        self.limit = settings.concurrencyremote
        self.per_destination = settings.concurrencydestination
        self.destinations: dict[str, Destination] = {}
        self.turns: deque[Destination] = deque()
        self.active = 0
        self.in_memory = 0
        self.room = asyncio.Event()
        self.room.set()
        self.stopping = False
        self._sessions: set[asyncio.Task[None]] = set()
        self._marking: set[asyncio.Future[None]] = set()  # entries being finished (removed) on io threads
        self._unmarked: list[tuple[Message, list[Mark]]] = []  # checkpoints waiting for the flusher
        self._flusher: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[None]] = set()
        self._messages: dict[str, Message] = {}

    # -- intake ---------------------------------------------------------------------------------
    def add(self, claim: Claim, envelope: Envelope) -> None:
        """Queue a claimed message's pending remote recipients, one delivery per domain."""
        by_domain: dict[str, list[int]] = {}
        for index in envelope.pending("remote"):
            domain = domain_of(envelope.recipients[index].address)
            by_domain.setdefault(ascii_domain(domain) or domain.lower(), []).append(index)
        if not by_domain:
            self.on_done(claim)
            return
        step = 1 if envelope.verp else self.settings.remotercptlimit  # VERP: a transaction per recipient
        chunks = [(d, ix[i : i + step]) for d, ix in by_domain.items() for i in range(0, len(ix), step)]
        message = Message(claim, envelope, len(chunks))
        self._messages[claim.job_id] = message
        self._count(+1)
        for domain, indexes in chunks:
            destination = self._destination(domain)
            destination.queue.append(Delivery(message, domain, indexes))
            self._wake(destination)

    def _count(self, change: int) -> None:
        self.in_memory += change
        if self.in_memory < self.settings.remoteactivelimit:
            self.room.set()
        else:
            self.room.clear()

    def _destination(self, domain: str) -> Destination:
        """The destination's state (made on first use; dropped again when idle)."""
        static = static_route(domain, self.settings.smtproutes)
        key = f"[{static.address}]:{static.port}" if static else domain
        destination = self.destinations.get(key)
        if destination is None:
            destination = self.destinations[key] = Destination(key, static)
        return destination

    # -- scheduling -----------------------------------------------------------------------------
    def _wake(self, destination: Destination) -> None:
        """Sessions for what is queued: one per delivery not yet taken by a session about to start."""
        while (len(destination.queue) > destination.starting and destination.active < self.per_destination
               and not self.stopping):
            if self.active >= self.limit:
                if not destination.waiting:
                    destination.waiting = True
                    self.turns.append(destination)
                return
            self._start(destination)

    def _start(self, destination: Destination) -> None:
        destination.active += 1
        destination.starting += 1
        self.active += 1
        task = asyncio.get_running_loop().create_task(self._session(destination))
        self._sessions.add(task)
        task.add_done_callback(self._sessions.discard)

    def _next_turns(self) -> None:
        """A session slot came free: give it to the destinations waiting, in turn."""
        while self.turns and self.active < self.limit and not self.stopping:
            destination = self.turns.popleft()
            destination.waiting = False
            if len(destination.queue) > destination.starting and destination.active < self.per_destination:
                self._start(destination)
                if len(destination.queue) > destination.starting and destination.active < self.per_destination:
                    destination.waiting = True
                    self.turns.append(destination)

    # -- sessions -------------------------------------------------------------------------------
    async def _session(self, destination: Destination) -> None:
        session: Session | None = None
        starting = True
        try:
            while destination.queue and not self.stopping:
                delivery = destination.queue.popleft()
                if starting:
                    destination.starting -= 1
                    starting = False
                if session is None:
                    session = self._take_idle(destination)
                session = await self._deliver(destination, delivery, session)
                if session is not None and session.transactions >= self.settings.reusecount:
                    await session.quit()
                    session = None
        finally:
            if starting:
                destination.starting -= 1
            destination.active -= 1
            self.active -= 1
            if session is not None:
                self._park(destination, session)
            self._next_turns()
            if destination.queue:
                self._wake(destination)
            self._forget_if_idle(destination)

    def _forget_if_idle(self, destination: Destination) -> None:
        """A destination with nothing queued, running or parked is dropped (a sender meets millions
        of domains); its resolved hops go with it, dnspython's cache keeps the records."""
        if not (destination.queue or destination.active or destination.idle or destination.waiting):
            self.destinations.pop(destination.key, None)

    def _take_idle(self, destination: Destination) -> Session | None:
        while destination.idle:
            session, timer = destination.idle.pop()
            timer.cancel()
            if session.alive():
                return session
            session.abort()
        return None

    def _park(self, destination: Destination, session: Session) -> None:
        if self.stopping or not session.alive() or not self.settings.reuseidle or session.dirty:
            self._close(session)
            return
        loop = asyncio.get_running_loop()
        entry: list[tuple[Session, asyncio.TimerHandle]] = []

        def expire() -> None:
            with contextlib.suppress(ValueError):
                destination.idle.remove(entry[0])
            self._close(session)
            self._forget_if_idle(destination)

        entry.append((session, loop.call_later(self.settings.reuseidle, expire)))
        destination.idle.append(entry[0])

    def _close(self, session: Session) -> None:
        """QUIT in the background, politely, without holding up the session slot."""
        task = asyncio.get_running_loop().create_task(session.quit())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _hops(self, destination: Destination, domain: str) -> list[Hop] | Deferred | Failed:
        if destination.static is not None:
            return [destination.static]
        now = time.monotonic()
        if destination.hops is not None and now < destination.hops_until:
            return destination.hops
        found = await route(domain, self.resolver, [])
        if isinstance(found, list):
            destination.hops, destination.hops_until = found, now + ROUTE_TTL
        return found

    async def _open(self, destination: Destination, domain: str) -> Session | Outcome:
        hops = await self._hops(destination, domain)
        if not isinstance(hops, list):
            return hops
        last: Outcome = Deferred("4.4.1", f"{domain}: no mail exchanger to try")
        for hop in hops[:MAX_HOPS]:
            try:
                return await open_session(Peer(hop.host, hop.address, hop.port), self.client)
            except HopFailure as failure:
                log.info("%s: %s", destination.key, failure.outcome.text)
                last = failure.outcome
        return last

    async def _deliver(self, destination: Destination, delivery: Delivery, session: Session | None
                       ) -> Session | None:
        """One transaction (a new connection if needed); returns the session still usable, if any."""
        message = delivery.message
        try:
            envelope, body = self.map.spool(message.claim.shard).load(message.envelope.id)
        except FileNotFoundError:
            self._record(delivery, [])  # removed meanwhile (e.g. by an admin): nothing to send
            return session
        except OSError as exc:
            self._record(delivery, [Deferred("4.3.0", f"spool read failed: {exc.strerror}")] * len(delivery.indexes))
            return session
        utf8 = needs_smtputf8(envelope, body)
        sender = "" if envelope.sender == DOUBLE_BOUNCE_SENDER else wire_address(
            envelope.sender_for(delivery.indexes[0]) if envelope.verp else envelope.sender, utf8)
        recipients = [wire_address(envelope.recipients[i].address, utf8) for i in delivery.indexes]
        data = wire_data(body)
        for _ in range(2):
            if session is None:
                opened = await self._open(destination, delivery.domain)
                if not isinstance(opened, Session):
                    self._record(delivery, [opened] * len(recipients))
                    self._dead(destination, delivery.domain, opened)
                    return None
                session = opened
            try:
                outcomes = await session.send(sender, recipients, data, utf8)
            except StaleSession:
                session = None  # the peer closed it while idle: a fresh one, once
                continue
            faults.crash_point("before_remote_mark")  # the one window for a duplicate (RFC 1047)
            self._record(delivery, outcomes)
            return session if session.alive() else None
        self._record(delivery, [Deferred("4.4.2", f"{destination.key}: connection closed at once, twice")]
                     * len(recipients))
        return None

    def _dead(self, destination: Destination, domain: str, outcome: Outcome) -> None:
        """Every hop failed: what waits for the same domain gets the same answer now."""
        keep: deque[Delivery] = deque()
        while destination.queue:
            delivery = destination.queue.popleft()
            if delivery.domain == domain:
                self._record(delivery, [outcome] * len(delivery.indexes))
            else:
                keep.append(delivery)
        destination.queue = keep

    # -- checkpoints ----------------------------------------------------------------------------
    def _record(self, delivery: Delivery, outcomes: list[Outcome]) -> None:
        message = delivery.message
        now = time.time()
        marks = []
        for index, outcome in zip(delivery.indexes, outcomes, strict=False):
            state = _state(outcome)
            log.info("%s to <%s>: %s %s %s", message.envelope.id, message.envelope.recipients[index].address,
                     state, outcome.status, outcome.text)
            marks.append(Mark(index, state, outcome.status, outcome.text[:500], now))  # type: ignore[arg-type]
        message.marks.extend(marks)
        metrics.outcomes("remote", marks)
        self._unmarked.append((message, marks))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        """Checkpoints as group commits: one at a time, each taking every checkpoint that came in
        meanwhile (appends, then one flush per shard; see Spool.mark_many)."""
        loop = asyncio.get_running_loop()
        while self._unmarked:
            batch, self._unmarked = self._unmarked, []
            try:
                errors = await loop.run_in_executor(self.io, self._checkpoint, batch)
            except Exception as exc:  # a bug, not a disk: no checkpoint of the batch is known durable
                log.exception("checkpoints failed")
                errors = [exc] * len(batch)  # type: ignore[list-item]
            for (message, _), error in zip(batch, errors, strict=True):
                self._marked(message, error)

    def _checkpoint(self, batch: list[tuple[Message, list[Mark]]]) -> list[OSError | None]:
        """On an io thread: make the marks durable (the per-recipient checkpoint)."""
        errors: list[OSError | None] = [None] * len(batch)
        by_shard: dict[int, list[int]] = {}
        for i, (message, marks) in enumerate(batch):
            if marks:
                by_shard.setdefault(message.claim.shard, []).append(i)
        for shard, indexes in by_shard.items():
            results = self.map.spool(shard).mark_many([(batch[i][0].envelope.id, batch[i][1]) for i in indexes])
            for i, error in zip(indexes, results, strict=True):
                errors[i] = None if isinstance(error, FileNotFoundError) else error  # gone: nothing to keep
        return errors

    def _marked(self, message: Message, error: BaseException | None) -> None:
        if error is not None:
            log.error("checkpoint of %s failed: %s (the sweep will come back to it)", message.envelope.id, error)
            message.unsafe = True
        message.outstanding -= 1
        if message.outstanding:
            return
        self._messages.pop(message.claim.job_id, None)
        self._count(-1)
        if message.unsafe:
            self.on_done(message.claim)  # some marks are not durable: the entry stays for the sweep
            return
        done = asyncio.get_running_loop().run_in_executor(self.io, self._finish_message, message)
        self._marking.add(done)
        done.add_done_callback(lambda f: self._finished(f, message))

    def _finished(self, future: asyncio.Future[None], message: Message) -> None:
        self._marking.discard(future)
        if future.exception() is not None:
            log.error("removing %s failed: %s (the sweep will)", message.envelope.id, future.exception())
        self.on_done(message.claim)

    def _finish_message(self, message: Message) -> None:
        """On an io thread: remove the entry when every recipient of every channel is delivered. One
        with a failed recipient stays until its bounce is made (scheduler): an accepted message is
        delivered, bounced, or still in the queue, never just gone."""
        spool = self.map.spool(message.claim.shard)
        envelope = message.envelope.with_marks([*message.envelope.marks, *message.marks])
        if envelope.pending("local"):
            return  # the local pool owns the rest, and removes the entry when it is done
        if any(r.channel == "local" for r in envelope.recipients):
            try:
                envelope = spool.read(envelope.id)  # the local pool marks the same file
            except FileNotFoundError:
                return
        if envelope.done():
            spool.remove(envelope.id)

    def claims(self) -> list[Claim]:
        """The claims of every message held (for renewing their leases)."""
        return [m.claim for m in self._messages.values()]

    # -- stopping -------------------------------------------------------------------------------
    async def stop(self, grace: float) -> list[Claim]:
        """Start no new delivery, let the transactions in flight end (for ``grace`` seconds), make
        every checkpoint durable, and return the claims of messages not finished (to requeue)."""
        self.stopping = True
        if self._sessions:
            _, pending = await asyncio.wait(set(self._sessions), timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        for destination in self.destinations.values():
            while destination.idle:
                session, timer = destination.idle.pop()
                timer.cancel()
                session.abort()
        while self._marking or (self._flusher is not None and not self._flusher.done()):
            await asyncio.wait({*self._marking, *([self._flusher] if self._flusher else [])})
        left = [m.claim for m in self._messages.values()]
        self._messages.clear()
        return left
