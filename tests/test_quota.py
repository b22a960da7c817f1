"""Mailbox quotas: the ``ldapdefaultquota*`` defaults for users without their own, an entry's own
value winning, and the quota warning (once per period, one among racing deliveries); real spool,
real Redis, real Maildirs, users from the LDIF directory and from a real slapd."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from core.config import load
from core.directory import open_directory
from core.outcome import Deferred, Delivered, Failed
from core.redis_conn import connect
from core.submit import Draft, Submitter
from tests.conftest import Node
from tests.slapd import Slapd
from tests.test_ldap import ldap_env
from tests.test_local import Rig, make_rig
from workers.local import LocalDelivery
from workers.maildir import WARNING_STAMP


def _send(rig: Rig, rcpt: str, body: bytes = b"Subject: hi\r\n\r\nhello\r\n") -> list[tuple[str, str]]:
    envelope = rig.submitter.accept(Draft(rig.submitter.new_id(), "a@example.net", [rcpt], body))
    rig.run(envelope)
    return rig.marks(envelope)


def _warnings(rig: Rig, store: str) -> list[bytes]:
    return [m for m in rig.inbox(store) if b"Subject: Your mailbox is nearly full" in m]


def test_default_count_quota_applies_to_users_without_their_own(node_factory: Callable[..., Node],
                                                                 tmp_path: Path) -> None:
    rig = make_rig(node_factory, tmp_path, ldapdefaultquotacount="2")
    assert _send(rig, "alice@test.example") == [] and _send(rig, "alice@test.example") == []
    assert _send(rig, "alice@test.example") == [("deferred", "4.2.2")]  # the default's third message
    assert len(rig.inbox("alice")) == 2


def test_an_entrys_own_quota_wins_over_the_default(node_factory: Callable[..., Node], tmp_path: Path) -> None:
    rig = make_rig(node_factory, tmp_path, ldapdefaultquotacount="1", ldapdefaultquotasize="50")
    # small: mailQuotaCount 2, mailQuotaSize 100000 of its own, so neither default limits it
    assert _send(rig, "small@test.example") == [] and _send(rig, "small@test.example") == []
    assert _send(rig, "small@test.example") == [("deferred", "4.2.2")]
    # alice has none of her own: 50 bytes in all, so a longer message is larger than the whole quota
    assert _send(rig, "alice@test.example") == [("failed", "5.2.2")]


def test_default_size_quota_from_a_real_slapd(slapd: Slapd, node_factory: Callable[..., Node]) -> None:
    env = ldap_env(slapd)
    node = node_factory(**{k[len("SHARDMAIL_"):].lower(): v for k, v in env.items()}, ldapdefaultquotasize="150")
    settings = node.settings()
    conn = connect(settings)
    submitter = Submitter(settings, conn)
    delivery = LocalDelivery(settings, open_directory(settings), submitter, conn)
    small = b"Subject: s\r\n\r\nx\r\n"
    big = b"Subject: b\r\n\r\n" + b"y" * 200 + b"\r\n"

    def outcome(rcpt: str, body: bytes) -> object:
        envelope = submitter.accept(Draft(submitter.new_id(), "a@example.net", [rcpt], body))
        return delivery.deliver(envelope, 0, body)

    # alice has no quota in the directory: the 150-byte default holds her to it
    refused = outcome("alice@test.example", big)
    assert isinstance(refused, Failed) and refused.status == "5.2.2"
    assert isinstance(outcome("alice@test.example", small), Delivered)
    # heidi has mailQuotaSize 10000 of her own: the default does not apply
    assert isinstance(outcome("heidi@test.example", big), Delivered)
    assert load(env=env).ldapdefaultquotasize == 0  # the default is off unless configured


def test_quota_warning_once_per_period(node_factory: Callable[..., Node], tmp_path: Path) -> None:
    rig = make_rig(node_factory, tmp_path, ldapdefaultquotacount="10", quotawarning="30",
                   quotawarningperiod="3600", quotawarningtext="Call the help desk on 1234.")
    assert _send(rig, "alice@test.example") == [] and _send(rig, "alice@test.example") == []
    assert _warnings(rig, "alice") == []  # 2 of 10: below 30 %
    assert _send(rig, "alice@test.example") == []  # 3 of 10: the warning
    (warning,) = _warnings(rig, "alice")
    assert b"Return-Path: <>" in warning and b"Delivered-To: alice@test.example" in warning
    assert b"3 of 10 messages (30 %)" in warning and b"Call the help desk on 1234." in warning
    for _ in range(3):
        assert _send(rig, "alice@test.example") == []
    assert len(_warnings(rig, "alice")) == 1  # not again within the period
    stamp = rig.store / "alice" / WARNING_STAMP
    stamp.write_text(f"{float(stamp.read_text()) - 3601:.6f}\n")  # the period has passed
    assert _send(rig, "alice@test.example") == []
    assert len(_warnings(rig, "alice")) == 2


def test_quota_warning_when_a_copy_is_held_back(node_factory: Callable[..., Node], tmp_path: Path) -> None:
    rig = make_rig(node_factory, tmp_path, quotawarning="90")
    # tiny: mailQuotaSize 300; a 250-byte copy fits under the whole quota but not beside another
    body = b"Subject: b\r\n\r\n" + b"y" * 180 + b"\r\n"
    assert _send(rig, "tiny@test.example", body) == []
    assert _warnings(rig, "tiny") == []  # about 85 % of 300 bytes: below 90 %
    assert _send(rig, "tiny@test.example", body) == [("deferred", "4.2.2")]
    assert len(_warnings(rig, "tiny")) == 1  # the held-back copy would have taken it past the quota
    assert _send(rig, "tiny@test.example", body) == [("deferred", "4.2.2")]
    assert len(_warnings(rig, "tiny")) == 1  # once per period


def test_quota_warning_is_off_by_default(node_factory: Callable[..., Node], tmp_path: Path) -> None:
    rig = make_rig(node_factory, tmp_path)
    for _ in range(2):
        _send(rig, "small@test.example")
    assert _send(rig, "small@test.example") == [("deferred", "4.2.2")]  # full, and still no warning
    assert _warnings(rig, "small") == [] and not (rig.store / "small" / WARNING_STAMP).exists()


def test_racing_deliveries_claim_one_warning(node_factory: Callable[..., Node], tmp_path: Path) -> None:
    rig = make_rig(node_factory, tmp_path, ldapdefaultquotacount="100", quotawarning="1")
    envelopes = [rig.submitter.accept(Draft(rig.submitter.new_id(), "a@example.net", ["alice@test.example"],
                                            b"Subject: r\r\n\r\nrace\r\n")) for _ in range(8)]
    start = threading.Barrier(len(envelopes))
    outcomes: list[object] = []

    def deliver(envelope: object) -> None:
        start.wait()
        body = rig.submitter.map.spool(envelope.shard).body(envelope.id)  # type: ignore[attr-defined]
        outcomes.append(rig.jobs.delivery.deliver(envelope, 0, body))  # type: ignore[arg-type]

    threads = [threading.Thread(target=deliver, args=(e,)) for e in envelopes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(outcomes) == 8 and all(isinstance(o, Delivered) for o in outcomes)
    assert not any(isinstance(o, Deferred) for o in outcomes)
    assert len(_warnings(rig, "alice")) == 1
