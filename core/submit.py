"""The one front door: every message (SMTP, inject, forwards, bounces) enters the queue here.

Interface: ``Submitter(settings, conn)`` with ``new_id()``, ``route(address) -> Channel`` and
``accept(message_id, sender, recipients, body, client=..., smtputf8=...) -> Envelope``.
``accept`` = pick a shard, write + fsync + commit the spool file, enqueue one job per channel in
one pipelined Redis round trip. When it returns, the message is durable and queued: the caller
may say 250 (or exit 0).

Failures: raises ``QueueUnavailable`` (temporary, 4.3.0) when the spool write fails (ENOSPC, EIO,
...) or Redis cannot take the jobs. In the Redis case the commit is withdrawn durably before the
exception, so a 4xx never leaves behind a message that would be delivered later; if even the
withdrawal fails, the message stays committed, the sweep will enqueue it, and ``accept`` returns
normally (a 250 is then the truthful answer).

Settings: ``me``, ``locals``, plus those of core.shards.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import redis

from core import faults
from core.address import domain_matches, domain_of
from core.config import Settings
from core.envelope import Channel, Client, Envelope, Recipient, new_id, node_tag
from core.jobs import Item, Jobs
from core.outcome import Deferred, QueueUnavailable
from core.shards import NoShardAvailable, Picker, ShardMap

log = logging.getLogger("shardmail.submit")


class Submitter:
    def __init__(self, settings: Settings, conn: redis.Redis) -> None:
        self.settings = settings
        self.map = ShardMap(settings)
        self.jobs = Jobs(conn, settings.redis_prefix)
        self.picker = Picker(self.map, self.jobs, settings.shard_policy)
        self._node = node_tag(settings.me)
        self._locals = [d.lower() for d in settings.locals]

    def new_id(self) -> str:
        return new_id(self._node)

    def route(self, address: str) -> Channel:
        """local for our own domains (and the postmaster without a domain), remote otherwise."""
        domain = domain_of(address)
        return "local" if not domain or domain_matches(domain, self._locals) else "remote"

    def accept(
        self,
        message_id: str,
        sender: str,
        recipients: Sequence[str],
        body: bytes,
        client: Client | None = None,
        smtputf8: bool = False,
    ) -> Envelope:
        try:
            shard = self.picker.pick()
        except NoShardAvailable as exc:
            raise QueueUnavailable(Deferred("4.3.0", str(exc))) from None
        envelope = Envelope(
            id=message_id,
            sender=sender,
            recipients=tuple(Recipient(r, self.route(r)) for r in recipients),
            birth=time.time(),
            shard=shard,
            size=len(body),
            smtputf8=smtputf8,
            client=client or Client(),
        )
        spool = self.map.spool(shard)
        try:
            spool.write(envelope, body)
        except OSError as exc:
            log.error("spool write failed for %s on shard %d: %s", message_id, shard, exc)
            raise QueueUnavailable(Deferred("4.3.0", f"queue write failed: {exc.strerror}")) from None
        items = []
        for channel in envelope.channels():
            count = sum(1 for r in envelope.recipients if r.channel == channel)
            items.append(Item(shard, message_id, channel, count))
        try:
            faults.check("submit.enqueue")
            self.jobs.enqueue(items)
        except (redis.RedisError, OSError) as exc:
            log.error("enqueue failed for %s on shard %d: %s", message_id, shard, exc)
            try:
                spool.withdraw(message_id)
            except OSError as undo:
                log.error("could not withdraw %s (%s); the sweep will enqueue it", message_id, undo)
                return envelope
            raise QueueUnavailable(Deferred("4.3.0", "queue temporarily unavailable")) from None
        faults.crash_point("after_enqueue")
        return envelope
