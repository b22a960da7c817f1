"""The one front door: every message (SMTP, inject, forwards, bounces) enters the queue here.

Interface: ``Draft`` (a message not yet accepted), ``Submitter(settings, conn)`` with ``new_id()``,
``route(address) -> Channel``, ``accept(draft) -> Envelope`` and ``accept_batch(drafts)``.
Accepting = pick a shard, write + fsync + commit the spool file, enqueue one job per channel (a
draft marked ``held``, mail moved in from another node where it was on hold, is committed into
hold/ instead and gets no job; a ``birth`` given is kept, so its retries and lifetime go on); a
batch shares the syncs (across its shards, when they share a file system) and one pipelined Redis
round trip (group commit). Mail for remote recipients from a trusted client is DKIM-signed first
(core.dkim), so the spool holds the signed bytes. A draft's ``verp`` delimiters go into the
envelope (core.verp: each recipient's delivery and bounce then use its own VERP sender). When a draft
comes back as an ``Envelope``, it is durable and queued: the caller may say 250 (or exit 0).

Failures: a draft comes back as (or ``accept`` raises) ``QueueUnavailable`` (temporary, 4.3.0) when
its spool write fails (ENOSPC, EIO, ...) or Redis cannot take the jobs. In the Redis case the
commits are withdrawn durably first, so a 4xx never leaves behind a message that would be
delivered later; if even the withdrawal fails, the messages stay committed, the sweep will
enqueue them, and they count as accepted (a 250 is then the truthful answer).

With ``dkim_ldap``, a draft whose signing domain the directory cannot tell comes back as
``QueueUnavailable`` (4.4.3). At start, ``Submitter(...)`` raises ``ConfigError`` when a DKIM key
cannot be loaded.

Settings: ``me``, ``locals``, plus those of core.shards and core.dkim.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import redis

from core import faults, metrics
from core.address import domain_matches, domain_of
from core.config import Settings
from core.dkim import Signer, SigningUnavailable
from core.envelope import Channel, Client, Envelope, Recipient, new_id, node_tag
from core.jobs import Item, Jobs
from core.outcome import Deferred, QueueUnavailable
from core.shards import Namespace, NoShardAvailable, Picker, ShardMap
from core.spool import write_batches
from core.verp import NO_VERP_SENDERS

log = logging.getLogger("shardmail.submit")


@dataclass(frozen=True, slots=True)
class Draft:
    """A message on its way in: everything but the shard and the birth time."""

    message_id: str
    sender: str  # "" = null sender
    recipients: Sequence[str]
    body: bytes  # CRLF line endings, headers included
    client: Client = field(default_factory=Client)
    smtputf8: bool = False
    birth: float | None = None  # a message moved in from another node keeps its birth (None = now)
    held: bool = False  # and, held there, is committed into hold/ here: no job, no delivery
    verp: str = ""  # VERP delimiters (core.verp), or "" for none; dropped for the null sender


Result = Envelope | QueueUnavailable


class Submitter:
    def __init__(self, settings: Settings, conn: redis.Redis) -> None:
        self.settings = settings
        self.map = ShardMap(settings)
        self.jobs = Jobs(conn, Namespace.of(settings))
        self.picker = Picker(self.map, self.jobs, settings.shard_policy)
        self._node = node_tag(settings.node)
        self._locals = [d.lower() for d in settings.locals]
        self.signer = Signer.of(settings)  # every DKIM key read now: a missing one is a ConfigError at start

    def new_id(self) -> str:
        return new_id(self._node)

    def route(self, address: str) -> Channel:
        """local for our own domains (and the postmaster without a domain), remote otherwise."""
        domain = domain_of(address)
        return "local" if not domain or domain_matches(domain, self._locals) else "remote"

    def accept(self, draft: Draft) -> Envelope:
        result = self.accept_batch([draft])[0]
        if isinstance(result, QueueUnavailable):
            raise result
        return result

    def accept_batch(self, drafts: Sequence[Draft]) -> list[Result]:
        results: list[Result | None] = [None] * len(drafts)
        by_shard: dict[int, list[tuple[int, Envelope]]] = {}
        now = time.time()
        bodies = [draft.body for draft in drafts]
        for index, draft in enumerate(drafts):
            try:
                shard = self.picker.pick()
            except NoShardAvailable as exc:
                results[index] = QueueUnavailable(Deferred("4.3.0", str(exc)))
                continue
            recipients = tuple(Recipient(r, self.route(r)) for r in draft.recipients)
            if self.signer is not None and any(r.channel == "remote" for r in recipients):  # signed once, here
                try:
                    bodies[index] = self.signer.header(draft.body, draft.sender, draft.client) + draft.body
                except SigningUnavailable as exc:
                    log.error("%s: %s", draft.message_id, exc)
                    results[index] = QueueUnavailable(Deferred("4.4.3", "directory unavailable for DKIM signing"))
                    continue
            envelope = Envelope(
                id=draft.message_id,
                sender=draft.sender,
                recipients=recipients,
                birth=now if draft.birth is None else min(draft.birth, now),
                shard=shard,
                size=len(bodies[index]),
                smtputf8=draft.smtputf8,
                client=draft.client,
                verp=draft.verp if draft.sender not in NO_VERP_SENDERS else "",
            )
            if draft.held:
                results[index] = self._accept_held(envelope, draft.body)
                continue
            by_shard.setdefault(shard, []).append((index, envelope))
        committed: dict[int, list[tuple[int, Envelope]]] = {}
        answers = write_batches([(self.map.spool(shard), [(env, bodies[i]) for i, env in entries])
                                 for shard, entries in by_shard.items()])
        for (shard, entries), errors in zip(by_shard.items(), answers, strict=True):
            for (index, envelope), error in zip(entries, errors, strict=True):
                if error is None:
                    committed.setdefault(shard, []).append((index, envelope))
                    continue
                log.error("spool write failed for %s on shard %d: %s", envelope.id, shard, error)
                results[index] = QueueUnavailable(Deferred("4.3.0", f"queue write failed: {error.strerror}"))
        if committed:
            self._enqueue(committed, results)
        faults.crash_point("after_enqueue")
        metrics.committed(results, time.time() - now)
        return results  # type: ignore[return-value]

    def _accept_held(self, envelope: Envelope, body: bytes) -> Result:
        """A held message: committed into hold/ and given no job (``shardmail queue release`` rings
        its bell)."""
        try:
            self.map.spool(envelope.shard).write_held(envelope, body)
        except OSError as exc:
            log.error("spool write failed for held %s on shard %d: %s", envelope.id, envelope.shard, exc)
            return QueueUnavailable(Deferred("4.3.0", f"queue write failed: {exc.strerror}"))
        return envelope

    def _enqueue(self, committed: dict[int, list[tuple[int, Envelope]]], results: list[Result | None]) -> None:
        items = []
        for entries in committed.values():
            for _, envelope in entries:
                for channel in envelope.channels():
                    count = sum(1 for r in envelope.recipients if r.channel == channel)
                    items.append(Item(envelope.shard, envelope.id, channel, count))
        try:
            faults.check("submit.enqueue")
            self.jobs.enqueue(items)
        except (redis.RedisError, OSError) as exc:
            log.error("enqueue failed for %d messages: %s", len(items), exc)
            metrics.redis_error("ingress")
            for shard, entries in committed.items():
                kept = set(self.map.spool(shard).withdraw([envelope.id for _, envelope in entries]))
                for index, envelope in entries:
                    if envelope.id in kept:
                        log.error("could not withdraw %s; it stays queued for the sweep", envelope.id)
                        results[index] = envelope
                    else:
                        results[index] = QueueUnavailable(Deferred("4.3.0", "queue temporarily unavailable"))
            return
        for entries in committed.values():
            for index, envelope in entries:
                results[index] = envelope
