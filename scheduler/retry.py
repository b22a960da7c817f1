"""What happens to a message after an attempt: retry it, bounce it, or let it go.

Interface: ``Settler(settings, conn, submitter, clock=time.time)`` with
``settle(shard, message_id, channels) -> str`` (one message after attempts on those channels;
returns what it did), ``settle_batch(shard, count) -> int`` (from the shard's settle list) and
``release(shard) -> int`` (due retries become jobs).

For a message (its spool entry is the truth; Redis only said which attempt ended):
1. a deferred recipient whose last attempt came at or after ``birth + queuelifetime`` fails for
   good (its 4.x.y becomes 5.x.y, with the reason kept): so after the lifetime exactly one more
   attempt is made, and a clock stepped forward never bounces mail without that attempt;
2. every failed recipient without a bounce gets one, a single bounce per message per round
   (scheduler.bounce; with VERP one per failed recipient, to its VERP address), entering through
   the front door; then those recipients are marked
   ``bounced`` (a crash between the two sends the bounce twice at most, never not at all). A
   bounce of a double bounce is dropped and logged;
3. an entry with every recipient delivered or bounced leaves the spool;
4. otherwise each channel asked about with recipients still pending goes into the shard's retry
   set at qmail's next attempt (core.backoff) after its latest deferral, or at once when a
   recipient was never tried.

``release`` moves due entries into their rq queues, keeping each queue under ``releasewindow``
jobs, so that a spool rebuilt into Redis (``shardmail recover``) costs a sorted-set entry per
message until its turn comes, not an rq job.

Failures: Redis or disk errors propagate (the serve loop backs off; the settle entry is lost, the
sweep finds the message again); an entry gone meanwhile is nothing to do; an undecodable one is
left to the sweep. A bounce that cannot be queued (QueueUnavailable) leaves its recipients failed,
to be tried again in the next round.

Settings: ``queuelifetime``, ``doublebounceto``, ``bouncemaxbytes``, ``releasewindow``, ``me``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

import redis

from core import faults, metrics
from core.backoff import expired, next_time
from core.config import Settings
from core.envelope import Channel, Envelope, EnvelopeError, Mark
from core.jobs import Jobs
from core.outcome import QueueUnavailable
from core.shards import Namespace
from core.submit import Draft, Submitter
from scheduler.bounce import bounces, compose, failure

log = logging.getLogger("shardmail.scheduler")
RELEASE_BATCH = 1000


class Settler:
    def __init__(self, settings: Settings, conn: redis.Redis, submitter: Submitter,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.jobs = Jobs(conn, Namespace.of(settings))
        self.submitter = submitter
        self.map = submitter.map
        self.clock = clock

    def settle_batch(self, shard: int, count: int = 500) -> int:
        entries = self.jobs.settled(shard, count)
        by_message: dict[str, set[Channel]] = {}
        for message_id, channel in entries:
            by_message.setdefault(message_id, set()).add(channel)
        for message_id, channels in by_message.items():
            try:
                self.settle(shard, message_id, channels)
            except OSError as exc:  # one entry's disk trouble: the sweep comes back to it
                log.error("settling %s failed: %s (left for the sweep)", message_id, exc)
        return len(entries)

    def settle(self, shard: int, message_id: str, channels: Iterable[Channel]) -> str:
        try:
            return self._settle(shard, message_id, channels)
        except FileNotFoundError:  # finished by someone else while we looked
            return "gone"

    def _settle(self, shard: int, message_id: str, channels: Iterable[Channel]) -> str:
        spool = self.map.spool(shard)
        try:
            envelope = spool.read(message_id)
        except FileNotFoundError:
            return "gone"
        except (EnvelopeError, OSError, UnicodeDecodeError) as exc:
            log.error("unreadable spool entry %s: %s (left for the sweep)", message_id, exc)
            return "unreadable"
        now = self.clock()
        expiring = self._expire(envelope, now)
        if expiring:
            spool.mark(message_id, expiring)
            metrics.settled(envelope, expiring)
            envelope = envelope.with_marks([*envelope.marks, *expiring])
        if envelope.unreported():
            envelope = self._bounce(envelope, now)
        if envelope.done():
            spool.remove(message_id)
            self.jobs.unschedule(shard, message_id)
            return "removed"
        entries = [(message_id, channel, when) for channel in channels
                   if (when := self.next_time(envelope, channel, now)) is not None]
        if entries:
            self.jobs.schedule(shard, entries)
            return "scheduled"
        return "waiting"

    def _expire(self, envelope: Envelope, now: float) -> list[Mark]:
        lifetime = self.settings.queuelifetime
        marks = []
        for index, mark in enumerate(envelope.states()):
            if mark is not None and mark.state == "deferred" and expired(envelope.birth, mark.at, lifetime):
                status = "5" + mark.status[1:] if mark.status.startswith("4.") else "5.4.7"
                days = lifetime / 86400
                marks.append(Mark(index, "failed", status,
                                  f"{mark.text} (given up: queued longer than {days:g} days)"[:500], now))
        return marks

    next_time = staticmethod(next_time)  # core.backoff's: when a channel is next due

    def _bounce(self, envelope: Envelope, now: float) -> Envelope:
        failed = envelope.unreported()
        targets = bounces(envelope, failed, self.settings.doublebounceto)
        if targets is None:
            log.warning("%s: double bounce failed for %s; discarded", envelope.id,
                        ", ".join(envelope.recipients[i].address for i in failed))
            return self._mark_bounced(envelope, failed, "bounce discarded (a double bounce failed)", now)
        body = self.map.spool(envelope.shard).load(envelope.id)[1]
        states = envelope.states()
        for sender, recipient, indexes in targets:  # one bounce, or (VERP) one per failed recipient
            failures = [failure(envelope.recipients[i].address, states[i]) for i in indexes]  # type: ignore[arg-type]
            bounce_id = self.submitter.new_id()
            raw = compose(envelope, failures, body, recipient, self.settings.me, self.settings.bouncemaxbytes,
                          bounce_id)
            try:
                self.submitter.accept(Draft(bounce_id, sender, [recipient], raw))
            except QueueUnavailable as exc:
                log.warning("%s: bounce not queued (%s); will try again", envelope.id, exc)
                return envelope
            faults.crash_point("after_bounce_queued")  # a crash here sends this bounce twice, never not at all
            note = f"bounced to <{recipient}> as {bounce_id}"
            log.info("%s: %s for %d recipient(s)", envelope.id, note, len(indexes))
            envelope = self._mark_bounced(envelope, indexes, note, now)
        return envelope

    def _mark_bounced(self, envelope: Envelope, indexes: list[int], note: str, now: float) -> Envelope:
        states = envelope.states()
        marks = [Mark(i, "bounced", states[i].status, note, now) for i in indexes]  # type: ignore[union-attr]
        self.map.spool(envelope.shard).mark(envelope.id, marks)
        metrics.settled(envelope, marks)
        return envelope.with_marks([*envelope.marks, *marks])

    def release(self, shard: int) -> int:
        """Due retries into their queues, while each queue holds fewer than ``releasewindow`` jobs."""
        room = {channel: self.settings.releasewindow - self.jobs.queue(shard, channel).count
                for channel in ("local", "remote")}
        if max(room.values()) <= 0:
            return 0
        due = self.jobs.due(shard, self.clock(), RELEASE_BATCH)
        chosen = []
        for message_id, channel in due:
            if room.get(channel, 0) > 0:
                room[channel] -= 1
                chosen.append((message_id, channel))
        self.jobs.release_due(shard, chosen)
        return len(chosen)
