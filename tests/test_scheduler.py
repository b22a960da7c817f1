"""The scheduler's decisions against a real spool and redis-server, with an injected clock: qmail's
retry times, the lifetime and its one last attempt, bounces (RFC 3464, to the right party), the
sweep (lost doorbells, corrupt entries, leftovers) and the per-shard leases."""

from __future__ import annotations

import email
import email.policy
import os
import time
from collections.abc import Callable
from pathlib import Path

import redis

from core.envelope import DOUBLE_BOUNCE_SENDER, Envelope, Mark, Recipient
from core.lease import Leases
from core.redis_conn import connect
from core.shards import Namespace
from core.submit import Draft, Submitter
from scheduler.retry import Settler
from scheduler.sweep import Sweeper
from tests.conftest import Node

DAY = 86400.0
BODY = b"From: <a@example.net>\r\nSubject: hello\r\n\r\ntext\r\n"


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Rig:
    def __init__(self, node: Node) -> None:
        self.settings = node.settings()
        self.conn = connect(self.settings)
        self.submitter = Submitter(self.settings, self.conn)
        self.clock = Clock(time.time())
        self.settler = Settler(self.settings, self.conn, self.submitter, self.clock)
        self.jobs = self.settler.jobs

    def spooled(self, shard: int, recipients: list[str], sender: str = "a@example.net", birth: float | None = None,
                marks: list[Mark] = ()) -> Envelope:  # type: ignore[assignment]
        """A committed message with a birth and marks of our choosing, and no job."""
        envelope = Envelope(self.submitter.new_id(), sender,
                            tuple(Recipient(r, self.submitter.route(r)) for r in recipients),
                            self.clock.now if birth is None else birth, shard, len(BODY))
        spool = self.submitter.map.spool(shard)
        spool.write(envelope, BODY)
        if marks:
            spool.mark(envelope.id, list(marks))
        return spool.read(envelope.id)

    def retry_time(self, shard: int, envelope: Envelope, channel: str) -> float | None:
        return self.conn.zscore(self.jobs.retry_key(shard), f"{envelope.id}:{channel}")

    def read(self, envelope: Envelope) -> Envelope | None:
        try:
            return self.submitter.map.spool(envelope.shard).read(envelope.id)
        except FileNotFoundError:
            return None

    def bounces(self) -> list[tuple[Envelope, email.message.EmailMessage]]:
        """Every bounce the front door took (they are the only messages from <> or #@[] here)."""
        found = []
        for shard in self.submitter.map.ids():
            spool = self.submitter.map.spool(shard)
            for message_id in spool.ids():
                envelope, body = spool.load(message_id)
                if envelope.sender in ("", DOUBLE_BOUNCE_SENDER) and b"multipart/report" in body:
                    found.append((envelope, email.message_from_bytes(body, policy=email.policy.default)))
        return found


def test_a_deferral_comes_back_at_qmails_time(node_factory: Callable[..., Node]) -> None:
    rig = Rig(node_factory())
    birth = rig.clock.now - 1000
    remote = rig.spooled(0, ["x@far.example"], birth=birth, marks=[Mark(0, "deferred", "4.4.1", "later", birth + 400)])
    local = rig.spooled(1, ["x@test.example"], birth=birth, marks=[Mark(0, "deferred", "4.2.2", "full", birth + 100)])
    fresh = rig.spooled(0, ["y@far.example"])
    assert rig.settler.settle(0, remote.id, ["remote"]) == "scheduled"
    assert rig.settler.settle(1, local.id, ["local"]) == "scheduled"
    assert rig.settler.settle(0, fresh.id, ["remote"]) == "scheduled"
    assert rig.retry_time(0, remote, "remote") == birth + 1600
    assert rig.retry_time(1, local, "local") == birth + 400
    assert rig.retry_time(0, fresh, "remote") == rig.clock.now  # never tried: at once
    assert rig.settler.release(0) == 1  # only the fresh one is due
    assert rig.jobs.queue(0, "remote").get_job_ids() == [f"n1-{fresh.id}-remote"]
    rig.clock.now = birth + 1600
    assert rig.settler.release(0) == 1
    assert rig.retry_time(0, remote, "remote") is None and rig.jobs.queue(0, "remote").count == 2


def test_clock_stepped_back_retries_at_once(node_factory: Callable[..., Node]) -> None:
    rig = Rig(node_factory())
    future_birth = rig.clock.now + 3600  # born "later" than now: the clock went back an hour since
    envelope = rig.spooled(0, ["x@far.example"], birth=future_birth,
                           marks=[Mark(0, "deferred", "4.4.1", "later", rig.clock.now)])
    rig.settler.settle(0, envelope.id, ["remote"])
    assert abs(rig.retry_time(0, envelope, "remote") - rig.clock.now) < 0.01  # marks keep milliseconds


def test_eight_days_on_one_last_attempt_then_the_bounce(node_factory: Callable[..., Node]) -> None:
    rig = Rig(node_factory())
    now = rig.clock.now
    birth = now - 8 * DAY  # the clock jumped ahead: the last attempt was a day after birth
    envelope = rig.spooled(0, ["x@far.example", "ok@far.example"], birth=birth,
                           marks=[Mark(0, "deferred", "4.4.1", "connect to mx.far.example[192.0.2.1]:25: timed out",
                                       birth + DAY), Mark(1, "delivered", "2.0.0", "250 ok", birth + DAY)])
    assert rig.settler.settle(0, envelope.id, ["remote"]) == "scheduled"  # not bounced: no attempt since
    assert rig.bounces() == []
    assert rig.retry_time(0, envelope, "remote") < now  # due now
    assert rig.settler.release(0) == 1
    # the final attempt fails temporarily again, after the lifetime: now it is permanent
    rig.submitter.map.spool(0).mark(envelope.id, [Mark(0, "deferred", "4.4.1", "timed out again", now)])
    assert rig.settler.settle(0, envelope.id, ["remote"]) == "removed"
    assert rig.read(envelope) is None
    ((bounce_envelope, bounce),) = rig.bounces()
    assert bounce_envelope.sender == "" and [r.address for r in bounce_envelope.recipients] == ["a@example.net"]
    status = next(p for p in bounce.iter_parts() if p.get_content_type() == "message/delivery-status")
    per_recipient = status.get_payload()[1]
    assert per_recipient["Final-Recipient"] == "rfc822; x@far.example"
    assert per_recipient["Action"] == "failed" and per_recipient["Status"] == "5.4.1"
    assert "given up" in per_recipient["Diagnostic-Code"]
    assert len(status.get_payload()) == 2  # the delivered recipient is not in the report


def test_bounces_go_to_the_sender_then_postmaster_and_never_further(node_factory: Callable[..., Node]) -> None:
    rig = Rig(node_factory())
    failed = [Mark(0, "failed", "5.1.1", "550 5.1.1 no such user (host mx.far.example[192.0.2.1]:25 in reply to "
                                         "RCPT TO)", rig.clock.now)]
    plain = rig.spooled(0, ["x@far.example"], marks=failed)
    from_null = rig.spooled(0, ["x@far.example"], sender="", marks=failed)
    double = rig.spooled(0, ["postmaster@far.example"], sender=DOUBLE_BOUNCE_SENDER, marks=failed)
    for envelope in (plain, from_null, double):
        assert rig.settler.settle(0, envelope.id, ["remote"]) == "removed"
    bounces = {e.sender: e for e, _ in rig.bounces()}
    assert [r.address for r in bounces[""].recipients] == ["a@example.net"]
    assert [r.address for r in bounces[DOUBLE_BOUNCE_SENDER].recipients] == ["postmaster"]
    assert bounces[DOUBLE_BOUNCE_SENDER].recipients[0].channel == "local"
    assert len(bounces) == 2  # the failed double bounce was dropped, not bounced again


def test_the_sweep_rebuilds_lost_doorbells_and_keeps_going(node_factory: Callable[..., Node], tmp_path: Path
                                                          ) -> None:
    node = node_factory()
    rig = Rig(node)
    queued = [rig.submitter.accept(Draft(rig.submitter.new_id(), "a@example.net", ["x@far.example"], BODY))
              for _ in range(6)]
    birth = rig.clock.now - 100
    deferred = rig.spooled(0, ["x@far.example"], birth=birth, marks=[Mark(0, "deferred", "4.4.1", "x", birth)])
    done = rig.spooled(1, ["x@far.example"], marks=[Mark(0, "delivered", "2.0.0", "250", rig.clock.now)])
    spool0 = rig.submitter.map.spool(0)
    corrupt = spool0.path("0" * 26)
    corrupt.write_bytes(b"this is no envelope\n")
    old = spool0.tmp / "00000000000001000000000000"
    old.write_bytes(b"partial")
    os.utime(old, (time.time() - 40 * 3600,) * 2)
    young = spool0.tmp / "00000000000002000000000000"
    young.write_bytes(b"partial")
    rig.conn.flushall()  # Redis forgot everything
    sweeper = Sweeper(rig.settler)
    reports = [sweeper.sweep(0), sweeper.sweep(1)]
    assert reports[0].corrupt == ["0" * 26] and (spool0.corrupt / ("0" * 26)).exists() and not corrupt.exists()
    assert reports[0].leftovers == 1 and not old.exists() and young.exists()
    assert sum(r.scheduled for r in reports) == 7 and sum(r.removed for r in reports) == 1
    assert rig.read(done) is None
    for envelope in queued:
        assert rig.retry_time(envelope.shard, envelope, "remote") == rig.clock.now
    assert rig.retry_time(0, deferred, "remote") == birth + 400
    # a second sweep finds every doorbell in place and changes nothing
    again = [sweeper.sweep(0), sweeper.sweep(1)]
    assert sum(r.scheduled for r in again) == 0 and sum(r.with_doorbell for r in again) == 7
    # and the rebuilt retry set costs little Redis per message
    used = rig.conn.memory_usage(rig.jobs.retry_key(0)) + rig.conn.memory_usage(rig.jobs.retry_key(1))
    assert used / 7 < 300


def test_each_shard_has_one_leader_and_a_dead_one_is_replaced(redis_url: str) -> None:
    conn = redis.Redis.from_url(redis_url)
    first = Leases(conn, Namespace("t", "n1"), "first", lambda: range(4))
    second = Leases(conn, Namespace("t", "n1"), "second", lambda: range(4))
    assert first.held() == [0, 1, 2, 3]
    assert second.held() == []
    assert first.held() == [0, 1, 2, 3]  # renewed, still its own
    first.give_up([1, 3])
    assert second.held() == [1, 3]
    for shard in (0, 2):
        conn.pexpire(first.key(shard), 1)  # as if the first had died: its lease runs out
    deadline = time.monotonic() + 5
    while second.held() != [0, 1, 2, 3]:
        assert time.monotonic() < deadline
    assert first.held() == []
