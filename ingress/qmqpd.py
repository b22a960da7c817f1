"""``shardmail qmqpd``: the QMQP server, for front ends and other nodes that hand over whole messages.

Interface: ``main(settings)`` serves ``qmqp_listen`` until SIGTERM/SIGINT; ``QmqpService(settings,
submitter, committer)`` with ``protocol()`` (a ``QmqpConnection`` for each connection: one request,
one reply, as qmail's qmail-qmqpd) and ``answer(payload, peer)``. ``shardmail run`` starts one when
``qmqp_listen`` is set.

A client outside ``qmqpclients`` is disconnected before a byte is read (QMQP mail is trusted to
relay: that is what it is for, so the default trusts no one). ``K`` is said only after the same
durable commit as SMTP's 250 (core.submit through ingress.committer's group commit). The message
gets a Received line naming QMQP and the client, CRLF line ends for the spool, and the same hop
limit as SMTP mail; after that a queue node treats it as its own SMTP mail.

Mail moved here by another node (``shardmail queue move``, ``shards move``: ops.move) starts with
one line ``X-Shardmail-Move: node=<node> id=<old id> birth=<unix time>[ hold=yes]``, which is
taken off: the message keeps its birth (its retry times and lifetime go on, however often it
moves), and one held there is committed into hold/ here (core.submit ``held``), never queued.
Only the very first line counts (every spooled message starts with a Received line of ours), and
only clients in ``qmqpclients`` reach this at all: they are trusted to relay, so they may hold.
The new id is remembered in Redis for ``MOVED_TTL`` (``<prefix>:moved:<this node>:<node>/<old
id>``, set once the copy is queued, before the K): a mover killed while our K was on its way asks
again on its rerun and gets the same K without a second copy (only Redis losing that key lets the
one copy too many through that the mover's journal allows).
The double-bounce sender ``#@[]`` and a bare ``postmaster`` recipient are taken as core.submit
takes them (a moved double bounce).

Failures: what the client got wrong is ``D`` (permanent, with an enhanced status code): a message
over ``databytes`` (from the length field alone), more than ``maxrcptcount`` recipients, a
malformed netstring or address, a routing loop. What we cannot do now is ``Z``: the spool or Redis
unavailable. A client that stops mid-request (EOF) or stays silent past ``timeoutsmtpd`` is
disconnected without a reply; nothing of a partial request reaches the spool.

Settings: ``qmqp_listen``, ``qmqpclients``, ``databytes``, ``maxrcptcount``, ``maxhops``,
``timeoutsmtpd``, ``ingress_threads``, ``me``, ``node``, ``redis_prefix``, plus those of core.submit.
"""

from __future__ import annotations

import asyncio
import email.utils
import ipaddress
import logging
import re
import time
from dataclasses import dataclass

import redis

from core import hops, sdnotify
from core.address import check_mailbox, clean_for_header, peer_in
from core.config import Settings
from core.envelope import DOUBLE_BOUNCE_SENDER, Client, valid_id
from core.outcome import QueueUnavailable
from core.qmqp import ProtocolError, Reply, Request, length_field, unpack
from core.redis_conn import connect
from core.submit import Draft, Submitter
from core.verp import qmail_form
from ingress.committer import Committer
from ingress.serve import listening_socket, run_on_uvloop, serve_until_stopped

log = logging.getLogger("shardmail.qmqpd")
ADDRESS_ROOM = 300  # bytes a recipient's netstring may take in the size bound
NO_LIMIT = 2**31
MOVE_HEADER = b"X-Shardmail-Move:"  # the first line of a message another node moves here (ops.move)
MOVED_TTL = 86400  # s a moved message's new id is remembered, for a mover that asks again after a crash
PEERS_CACHED = 4096  # client addresses whose qmqpclients verdict is remembered


class QmqpService:
    """What every connection shares: the settings, the limits, the committer."""

    def __init__(self, settings: Settings, submitter: Submitter, committer: Committer) -> None:
        self.settings = settings
        self.submitter = submitter
        self.committer = committer
        self.clients = [ipaddress.ip_network(n, strict=False) for n in settings.qmqpclients]
        body = settings.databytes or NO_LIMIT
        self.limit = body + 20 + ADDRESS_ROOM * (settings.maxrcptcount + 1)  # the outer netstring, whole
        self._allowed: dict[str, bool] = {}  # client address -> in qmqpclients (front ends are few)
        self._date = (0, "")  # the Received line's date, made once a second
        self.tasks: set[asyncio.Task[None]] = set()  # answers being worked out (kept from the collector)

    def protocol(self) -> QmqpConnection:
        return QmqpConnection(self)

    def allowed(self, peer: str) -> bool:
        known = self._allowed.get(peer)
        if known is None:
            if len(self._allowed) >= PEERS_CACHED:
                self._allowed.clear()
            known = self._allowed[peer] = peer_in(peer, self.clients)
        return known

    async def answer(self, payload: bytes, peer: str) -> Reply:
        """The reply to one whole request (the outer netstring's payload). A sender in qmail's VERP
        spelling (``prefix-@origin-@[]``: an ingress-only node's or a mover's) asks for VERP."""
        try:
            request = unpack(payload)
        except ProtocolError as exc:
            return Reply("D", f"bad QMQP request: {exc} (#5.5.2)")
        verp = ""
        if (spelled := qmail_form(request.sender)) is not None:
            request = Request(request.message, spelled[0], request.recipients)
            verp = spelled[1]
        refusal = self.check(request)
        if refusal is not None:
            return refusal
        return await self.commit(request, peer, verp)

    def check(self, request: Request) -> Reply | None:
        """The D for a request we must not take, or None."""
        if self.settings.databytes and len(request.message) > self.settings.databytes:
            return Reply("D", "message too big (#5.3.4)")
        if len(request.recipients) > self.settings.maxrcptcount:
            return Reply("D", f"too many recipients, {self.settings.maxrcptcount} at most (#5.5.3)")
        sender = [request.sender] if request.sender not in ("", DOUBLE_BOUNCE_SENDER) else []
        for address in sender + [r for r in request.recipients if r.lower() != "postmaster"]:
            problem = check_mailbox(address, smtputf8=True)
            if problem:
                return Reply("D", f"<{clean_for_header(address)}>: {problem} (#5.1.3)")
        return None

    async def commit(self, request: Request, peer: str, verp: str = "") -> Reply:
        move, message = moved_from(request.message)
        content = message.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        if content and not content.endswith(b"\r\n"):
            content += b"\r\n"
        if (loop := hops.check(content, self.settings.maxhops, added=1)) is not None:
            return Reply("D", f"{loop.text} (#{loop.status})")
        if move is not None and (earlier := await self._moved_before(move)):
            log.info("%s moved here before as %s (the mover asks again after a crash): not queued twice",
                     move.origin, earlier)
            return Reply("K", f"ok {earlier}")
        message_id = self.submitter.new_id()
        now = int(time.time())
        if self._date[0] != now:
            self._date = (now, email.utils.formatdate(now, localtime=True))
        received = (f"Received: from [{clean_for_header(peer)}]\r\n\tby {self.settings.me} (shardmail) with QMQP "
                    f"id {message_id}; {self._date[1]}\r\n")
        addresses = [request.sender, *request.recipients]
        draft = Draft(message_id, request.sender, request.recipients, received.encode() + content,
                      Client(address=peer, helo="", protocol="QMQP"), not all(a.isascii() for a in addresses),
                      birth=move.birth if move else None, held=bool(move and move.held), verp=verp)
        try:
            await self.committer.commit(draft)
        except QueueUnavailable as exc:
            return Reply("Z", f"{exc.outcome.text}, try again later (#{exc.outcome.status})")
        except Exception:
            log.exception("unexpected failure queueing %s", message_id)
            return Reply("Z", "internal error, try again later (#4.3.0)")
        log.info("queued %s by QMQP from %s: <%s> for %d rcpt, %d bytes%s", message_id, peer, request.sender,
                 len(request.recipients), len(draft.body),
                 f" (moved from {move.origin}{', on hold' if move.held else ''})" if move else "")
        if move is not None and move.known:
            await self._remember(move, message_id)
        return Reply("K", f"ok {message_id}")

    def _moved_key(self, move: Move) -> str:
        return f"{self.settings.redis_prefix}:moved:{self.settings.node}:{move.origin}"

    async def _moved_before(self, move: Move) -> str | None:
        """The id this node gave the same message when it was moved here before (None: never, or
        Redis does not say: then it is queued, and at worst once more)."""
        if not move.known:
            return None
        try:
            found = await asyncio.to_thread(self.submitter.jobs.conn.get, self._moved_key(move))
        except redis.RedisError as exc:
            log.warning("cannot look up whether %s moved here before: %s", move.origin, exc)
            return None
        return found.decode() if isinstance(found, bytes) else found

    async def _remember(self, move: Move, message_id: str) -> None:
        try:
            await asyncio.to_thread(self.submitter.jobs.conn.set, self._moved_key(move), message_id, ex=MOVED_TTL)
        except redis.RedisError as exc:
            log.warning("cannot record that %s moved here as %s: %s", move.origin, message_id, exc)


@dataclass(frozen=True, slots=True)
class Move:
    """What a node moving mail here says of a message in its ``X-Shardmail-Move`` line."""

    origin: str  # "<node>/<old id>"
    birth: float | None
    held: bool
    known: bool = False  # node and id given: a repeated request can be recognised


def moved_from(message: bytes) -> tuple[Move | None, bytes]:
    """The move line at the very top of a request's message (and the message without it), or
    (None, message). Only the first line counts: every message the spool holds starts with a
    Received line of ours, and the mover puts its own line above it, so a header of that name
    further down (from a sender) is never taken for one."""
    if message[: len(MOVE_HEADER)].lower() != MOVE_HEADER.lower():
        return None, message
    end = message.find(b"\n")
    line, rest = (message, b"") if end < 0 else (message[:end], message[end + 1:])
    fields = dict(word.partition("=")[::2] for word in line[len(MOVE_HEADER):].decode("ascii", "replace").split())
    try:
        birth: float | None = float(fields.get("birth", ""))
    except ValueError:
        birth = None
    if birth is not None and not (0 < birth < float("inf")):
        birth = None
    node, old_id = fields.get("node", ""), fields.get("id", "")
    known = valid_id(old_id) and re.fullmatch(r"[A-Za-z0-9_-]+", node) is not None
    return Move(f"{node or '?'}/{old_id or '?'}", birth, fields.get("hold") == "yes", known), rest


class QmqpConnection(asyncio.Protocol):
    """One client: one request, one reply, as qmail-qmqpd. The bytes are gathered as they come and
    the length field checked on the way; only a whole request gets a task (no stream objects: a
    queue node behind ingress-only nodes takes every message this way, and on the same machine its
    CPU is theirs)."""

    def __init__(self, service: QmqpService) -> None:
        self.service = service
        self.buffer = bytearray()
        self.head: tuple[int, int] | None = None  # (payload length, length field size) once read
        self.busy = False  # the request is whole: its answer is being worked out
        self.peer = ""
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.peer = str((transport.get_extra_info("peername") or ("",))[0])
        if not self.service.allowed(self.peer):
            log.warning("refused QMQP client %s: not in qmqpclients", self.peer)
            transport.close()
            return
        self.timer = asyncio.get_running_loop().call_later(self.service.settings.timeoutsmtpd, self._timed_out)

    def data_received(self, data: bytes) -> None:
        if self.busy:
            return  # past the request's end: nothing more is read
        self.buffer += data
        try:
            if self.head is None:
                self.head = length_field(self.buffer)
                if self.head is None:
                    return
                if self.head[0] > self.service.limit:
                    self._reply(Reply("D", "message too big (#5.3.4)"))  # from the length field alone
                    return
            length, start = self.head
            if len(self.buffer) <= start + length:
                return
            if self.buffer[start + length] != 0x2C:  # ","
                raise ProtocolError("netstring without its comma")
        except ProtocolError as exc:
            self._reply(Reply("D", f"bad QMQP request: {exc} (#5.5.2)"))
            return
        self.busy = True
        assert self.transport is not None
        self.transport.pause_reading()
        with memoryview(self.buffer) as view:
            payload = bytes(view[start:start + length])
        self.buffer = bytearray()
        task = asyncio.ensure_future(self._answer(payload))
        self.service.tasks.add(task)
        task.add_done_callback(self.service.tasks.discard)

    async def _answer(self, payload: bytes) -> None:
        try:
            reply = await self.service.answer(payload, self.peer)
        except Exception:
            log.exception("unexpected failure answering QMQP client %s", self.peer)
            reply = Reply("Z", "internal error, try again later (#4.3.0)")
        self._reply(reply)

    def eof_received(self) -> bool:
        if self.busy:
            return True  # the client's half is done; ours, the reply, is still to come
        if self.transport is not None and not self.transport.is_closing():
            log.warning("QMQP client %s closed mid-request", self.peer)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()

    def _timed_out(self) -> None:
        log.warning("QMQP client %s timed out", self.peer)
        if self.transport is not None:
            self.transport.close()

    def _reply(self, reply: Reply) -> None:
        """Say it and hang up (close sends what is buffered first); not to a client gone meanwhile."""
        if self.timer is not None:
            self.timer.cancel()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(reply.encode())
            self.transport.close()


async def serve(settings: Settings) -> None:
    submitter = Submitter(settings, connect(settings, max_connections=settings.ingress_threads + 4))
    committer = Committer(submitter, settings.ingress_threads)
    service = QmqpService(settings, submitter, committer)
    loop = asyncio.get_running_loop()
    servers = [await loop.create_server(service.protocol, sock=listening_socket(spec)) for spec in settings.qmqp_listen]
    log.info("QMQP on %s for %s", ", ".join(settings.qmqp_listen), ", ".join(settings.qmqpclients) or "no one")
    sdnotify.ready("QMQP on " + ", ".join(settings.qmqp_listen))
    await serve_until_stopped(servers)
    committer.close()


def main(settings: Settings) -> None:
    run_on_uvloop(serve(settings))
