"""An ingress-only node's intake: each accepted SMTP message is handed to a queue node over QMQP.

Interface: ``Handover(settings, registry=None)`` with ``new_id()`` and ``await commit(draft)``, the
same two calls ingress.smtpd makes of a spooling node's submitter and committer; ``Servers`` (which
queue nodes, in which order). ``role = "ingress"`` makes ingress.serve use it.

Why QMQP, as qmail's mini-qmail front ends did: the front end keeps no spool, so it can be added or
lost without losing mail, and the client hears 250 only once a queue node said ``K`` after its own
durable commit. Which queue node: ``qmqpservers`` in turn (qmail's control/qmqpservers), or, when
that list is empty, the live nodes of the cluster that announce a QMQP listener (core.nodes'
heartbeats), the least loaded (fewest spooled messages) first. A connect error, a timeout or ``Z``
moves on to the next within ``qmqptimeout``; ``D`` is the queue node's verdict on the message.

Failures: ``QueueUnavailable`` (451) when no queue node took the message (none known, every one
down or saying ``Z``); ``QueueRefused`` (554, with the queue node's text and status) for ``D``.

Mail from a trusted client for remote recipients is DKIM-signed here (core.dkim), as a spooling
node's front door would: the queue node, seeing only a relaying peer, leaves a signature of the
same domain alone.

Settings: ``qmqpservers``, ``qmqptimeout``, ``node``, ``locals``, plus those of core.dkim.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass, field

import redis

from core.address import domain_matches, domain_of
from core.config import Settings
from core.dkim import Signer, SigningUnavailable
from core.envelope import new_id, node_tag
from core.nodes import Registry
from core.outcome import Deferred, Failed, QueueRefused, QueueUnavailable
from core.qmqp import Reply, pack, reply_complete
from core.submit import Draft
from core.verp import qmail_spelling

log = logging.getLogger("shardmail.handover")
REFRESH = 2.0  # s a list of queue nodes from the registry is reused


@dataclass
class Servers:
    """The queue nodes to try for the next message, in order."""

    settings: Settings
    registry: Registry | None = None
    _turn: itertools.count[int] = field(default_factory=itertools.count)
    _known: list[tuple[str, int]] = field(default_factory=list)
    _read: float = -1e9

    def static(self) -> list[tuple[str, int]]:
        servers = []
        for spec in self.settings.qmqpservers:
            host, _, port = spec.rpartition(":")
            servers.append((host.strip("[]"), int(port)))
        return servers

    def due(self) -> bool:
        """Whether the next ``order`` reads the registry (a Redis round trip)."""
        return not self.settings.qmqpservers and self.registry is not None and \
            time.monotonic() - self._read > REFRESH

    def from_registry(self) -> list[tuple[str, int]]:
        """Live nodes with a QMQP listener, fewest spooled first (heartbeat figures, cached)."""
        if self.registry is None:
            return []
        now = time.monotonic()
        if now - self._read > REFRESH:
            try:
                records = self.registry.nodes(time.time())
            except redis.RedisError as exc:
                log.warning("queue nodes not refreshed (Redis: %s); using the last list", exc)
            else:
                ranked = sorted((sum(s[0] for s in r.spool.values()), r.name, r.qmqp_address())
                                for r in records if r.alive and r.qmqp and r.name != self.settings.node)
                self._known = [address for _, _, address in ranked if address is not None]
            self._read = now
        return self._known

    def order(self) -> list[tuple[str, int]]:
        if self.settings.qmqpservers:
            servers = self.static()
            start = next(self._turn) % len(servers)
            return servers[start:] + servers[:start]
        return self.from_registry()


class Handover:
    def __init__(self, settings: Settings, registry: Registry | None = None) -> None:
        self.settings = settings
        self.servers = Servers(settings, registry)
        self._tag = node_tag(settings.node)
        self._locals = [d.lower() for d in settings.locals]
        self.signer = Signer.of(settings)  # every DKIM key read now: a missing one is a ConfigError at start

    def new_id(self) -> str:
        return new_id(self._tag)

    async def commit(self, draft: Draft) -> Reply:
        """The queue node's K, once one gave it; raises QueueUnavailable or QueueRefused."""
        loop = asyncio.get_running_loop()
        if self.servers.due():  # the registry is read off the event loop, once per REFRESH
            servers = await loop.run_in_executor(None, self.servers.order)
        else:
            servers = self.servers.order()
        if not servers:
            raise QueueUnavailable(Deferred("4.3.0", "no queue node is known (qmqpservers, heartbeats)"))
        body = draft.body
        if self.signer is not None and any(not domain_matches(domain_of(r), self._locals) for r in draft.recipients):
            try:  # signed here, where the client's trust is known: the queue node sees a relaying peer
                body = await loop.run_in_executor(None, self.signer.header, body, draft.sender, draft.client) + body
            except SigningUnavailable as exc:
                raise QueueUnavailable(Deferred("4.4.3", str(exc))) from None
        sender = draft.sender
        if draft.verp:  # QMQP carries a sender only: VERP goes over in qmail's spelling of it
            spelled = qmail_spelling(draft.sender, draft.verp)
            if spelled is None:
                raise QueueRefused(Failed("5.5.4", f"VERP delimiters {draft.verp!r} cannot cross QMQP (only x=)"))
            sender = spelled
        request = pack(body, sender, draft.recipients)
        deadline = loop.time() + self.settings.qmqptimeout
        last = Reply("Z", "no queue node answered")
        for host, port in servers:
            left = deadline - loop.time()
            if left <= 0:
                break
            reply = await _exchange(host, port, request, left)
            if reply.accepted:
                log.info("handed %s over to %s:%d: %s", draft.message_id, host, port, reply.text)
                return reply
            if reply.permanent:
                refusal = reply.outcome(f"queue node {host}")
                assert isinstance(refusal, Failed)
                raise QueueRefused(refusal)
            log.warning("queue node %s:%d did not take %s: %s", host, port, draft.message_id, reply.text)
            last = reply
        status = last.outcome().status
        raise QueueUnavailable(Deferred(status, f"no queue node took the message ({last.text})"))


async def _exchange(host: str, port: int, request: bytes, timeout: float) -> Reply:
    """One QMQP conversation; any trouble on the way is a Z (the message may go elsewhere)."""
    writer = None
    received = b""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(request)
                writer.write_eof()
                await writer.drain()
            except (BrokenPipeError, ConnectionResetError):
                pass  # it may have answered early (D from the length field) and hung up: read that
            received = b""
            while not reply_complete(received) and (chunk := await reader.read(4096)):
                received += chunk
            return Reply.decode(received)
    except (OSError, TimeoutError) as exc:
        if reply_complete(received):  # it answered, then hung up on the rest of the request
            return Reply.decode(received)
        return Reply("Z", f"{host}:{port}: {exc.strerror if isinstance(exc, OSError) and exc.strerror else 'timeout'}")
    finally:
        if writer is not None:
            writer.close()

