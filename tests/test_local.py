"""Local delivery with qmail-ldap semantics: real spool, real Redis, real Maildirs; users from an
LDIF directory (the embedded backend; the LDAP backend answers the same searches)."""

from __future__ import annotations

import email
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import redis

from core.config import Settings
from core.directory import open_directory
from core.envelope import Envelope, Mark
from core.jobs import Claim
from core.redis_conn import connect
from core.submit import Draft, Submitter
from tests.conftest import Node
from workers.local import LocalDelivery
from workers.pool import LocalJobs

PEOPLE = {
    "alice": ["mailMessageStore: alice/"],
    "bob": ["mailMessageStore: bob/", "mailAlternateAddress: robert@test.example"],
    "dis": ["mailMessageStore: dis/", "accountStatus: disabled"],
    "del": ["mailMessageStore: del/", "accountStatus: deleted"],
    "noacc": ["mailMessageStore: noacc/", "accountStatus: noaccess"],
    "fwd": ["mailMessageStore: fwd/", "deliveryMode: nolocal", "mailForwardingAddress: one@elsewhere.example",
            "mailForwardingAddress: two@elsewhere.example"],
    "keep": ["mailMessageStore: keep/", "mailForwardingAddress: copy@elsewhere.example"],
    "away": ["mailMessageStore: away/", "deliveryMode: reply", "mailReplyText: I am away until Monday."],
    "small": ["mailMessageStore: small/", "mailQuotaCount: 2", "mailQuotaSize: 100000"],
    "tiny": ["mailMessageStore: tiny/", "mailQuotaSize: 300"],
    "strict": ["mailMessageStore: strict/", "mailSizeMax: 200"],
    "remote": ["mailMessageStore: remote/", "mailHost: mx2.test.example"],
    "here": ["mailMessageStore: here/", "mailHost: mx.test.example"],
    "esc1": ["mailMessageStore: ../../escape"],
    "esc2": ["mailMessageStore: /etc/"],
    "esc3": ["mailMessageStore: user/.."],
    "esc4": ["mailMessageStore: user/../../x"],
    "link": ["mailMessageStore: linked/inbox/"],
    "catchall": ["mailMessageStore: catchall/"],
    "sales-catchall": ["mailMessageStore: sales/"],
    "dup1": ["mailMessageStore: dup1/", "mailAlternateAddress: dup@test.example"],
    "dup": ["mailMessageStore: dup2/"],
    "prog": ["mailMessageStore: prog/", "deliveryProgramPath: /usr/bin/tee {out}"],
    "prog99": ["mailMessageStore: prog99/", "deliveryProgramPath: /bin/sh -c 'exit 99'"],
    "prog100": ["mailMessageStore: prog100/", "deliveryProgramPath: /bin/sh -c 'echo no such list; exit 100'"],
    "prog111": ["mailMessageStore: prog111/", "deliveryProgramPath: /bin/sh -c 'exit 111'"],
    "progslow": ["mailMessageStore: progslow/", "deliveryProgramPath: /bin/sleep 30"],
    "progoff": ["mailMessageStore: progoff/", "deliveryMode: noprogram", "deliveryProgramPath: /usr/bin/tee {out}"],
}


def ldif(out: str = "/nonexistent") -> str:
    entries = []
    for name, template in PEOPLE.items():
        lines = [line.replace("{out}", out) for line in template]
        entries.append("\n".join([f"dn: uid={name},ou=people,dc=example,dc=test", "objectClass: inetOrgPerson",
                                  "objectClass: qmailUser", f"uid: {name}", f"cn: {name}", f"sn: {name}",
                                  f"mail: {name}@test.example", *lines]))
    return "\n\n".join(entries) + "\n"


@dataclass
class Rig:
    settings: Settings
    submitter: Submitter
    jobs: LocalJobs
    store: Path
    conn: redis.Redis

    def send(self, rcpts: list[str], body: bytes = b"Subject: hi\r\n\r\nhello\r\n", sender: str = "a@example.net"
             ) -> Envelope:
        envelope = self.submitter.accept(Draft(self.submitter.new_id(), sender, rcpts, body))
        self.run(envelope)
        return envelope

    def run(self, envelope: Envelope) -> None:
        self.jobs.message(Claim(f"{envelope.id}-local", envelope.id, envelope.shard, "local", "x"))

    def marks(self, envelope: Envelope) -> list[tuple[str, str]]:
        spool = self.submitter.map.spool(envelope.shard)
        try:
            states = spool.read(envelope.id).states()
        except FileNotFoundError:
            return []
        return [(m.state, m.status) if m else ("pending", "") for m in states]

    def inbox(self, store: str) -> list[bytes]:
        new = self.store / store / "new"
        return [p.read_bytes() for p in sorted(new.iterdir())] if new.exists() else []

    def queued_to(self, address: str) -> list[tuple[Envelope, bytes]]:
        found = []
        for shard in self.submitter.map.ids():
            spool = self.submitter.map.spool(shard)
            for entry in spool.scan():
                if entry.envelope and any(r.address == address for r in entry.envelope.recipients):
                    found.append((entry.envelope, spool.body(entry.id)))
        return found


def make_rig(node_factory: Callable[..., Node], tmp_path: Path, **overrides: str) -> Rig:
    users = tmp_path / "people.ldif"
    users.write_text(ldif(str(tmp_path / "program.out")))
    settings = {"ldapnegcachettl": "0", "ldapcachettl": "0", **overrides}
    node = node_factory(users_ldif=str(users), ldapmessagestore=str(tmp_path / "mail"),
                        smtproutes="mx2.test.example:127.0.0.1:1", **settings)
    settings = node.settings()
    conn = connect(settings)
    submitter = Submitter(settings, conn)
    delivery = LocalDelivery(settings, open_directory(settings), submitter, conn)
    return Rig(settings, submitter, LocalJobs(settings, delivery, submitter, 2), tmp_path / "mail", conn)


@pytest.fixture
def rig(node_factory: Callable[..., Node], tmp_path: Path) -> Rig:
    return make_rig(node_factory, tmp_path)


def test_delivers_to_maildir_with_headers_and_lf_lines(rig: Rig) -> None:
    envelope = rig.send(["alice@test.example"])
    (message,) = rig.inbox("alice")
    assert message == b"Return-Path: <a@example.net>\nDelivered-To: alice@test.example\nSubject: hi\n\nhello\n"
    assert rig.marks(envelope) == []  # every recipient final: the spool entry is gone
    name = next((rig.store / "alice" / "new").iterdir()).name
    assert f"Q{envelope.id}R0" in name and name.endswith(f",S={len(message)}")
    assert (rig.store / "alice" / "cur").is_dir() and (rig.store / "alice" / "tmp").is_dir()


def test_a_repeated_attempt_finds_its_earlier_copy(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    envelope = rig.submitter.accept(Draft(rig.submitter.new_id(), "a@example.net", ["alice@test.example"],
                                          b"Subject: once\r\n\r\nx\r\n"))
    delivery = rig.jobs.delivery
    spool = rig.submitter.map.spool(envelope.shard)
    body = spool.body(envelope.id)
    assert delivery.deliver(envelope, 0, body).text == "delivered to maildir"
    # as after a crash between the link and the mark; also after a reader moved it to cur/
    assert delivery.deliver(envelope, 0, body).text.startswith("already in the maildir")
    new = rig.store / "alice" / "new"
    moved = next(new.iterdir())
    os.rename(moved, rig.store / "alice" / "cur" / (moved.name + ":2,S"))
    # a retry comes with a mark (an earlier deferral) or, after a crash, only once the message is
    # older than a first attempt could be: then cur/ is searched too
    retried = envelope.with_marks([Mark(0, "deferred", "4.2.2", "over quota", time.time())])
    assert delivery.deliver(retried, 0, body).text.startswith("already in the maildir")
    monkeypatch.setattr("workers.local.FIRST_ATTEMPT_WINDOW", 0.0)
    assert delivery.deliver(envelope, 0, body).text.startswith("already in the maildir")
    assert list(new.iterdir()) == [] and len(list((rig.store / "alice" / "cur").iterdir())) == 1


def test_alternate_address_and_account_status(rig: Rig) -> None:
    rcpts = ["robert@test.example", "dis@test.example", "del@test.example", "noacc@test.example"]
    envelope = rig.submitter.accept(Draft(rig.submitter.new_id(), "a@example.net", rcpts, b"x\r\n"))
    body = rig.submitter.map.spool(envelope.shard).body(envelope.id)
    outcomes = [rig.jobs.delivery.deliver(envelope, i, body) for i in range(len(rcpts))]
    assert [(type(o).__name__, getattr(o, "status", "")) for o in outcomes] == [
        ("Delivered", "2.0.0"), ("Failed", "5.2.1"), ("Failed", "5.1.1"), ("Delivered", "2.0.0")]
    assert len(rig.inbox("bob")) == 1 and len(rig.inbox("noacc")) == 1
    assert rig.inbox("dis") == [] and rig.inbox("del") == []


def test_unknown_user_fails_5_1_1_and_catchalls_catch(rig: Rig) -> None:
    rig.send(["sales-team-north@test.example", "whoever@test.example"])
    assert len(rig.inbox("sales")) == 1  # sales-catchall@ (dash extension) before catchall@
    assert len(rig.inbox("catchall")) == 1


def test_two_entries_for_one_address_defer_never_guess(rig: Rig) -> None:
    envelope = rig.submitter.accept(Draft(rig.submitter.new_id(), "a@example.net", ["dup@test.example"], b"x\r\n"))
    rig.run(envelope)
    assert rig.marks(envelope) == [("deferred", "4.3.0")]
    assert rig.inbox("dup1") == [] and rig.inbox("dup2") == []


def test_forwarding_with_nolocal_queues_a_copy_and_keeps_the_sender(rig: Rig) -> None:
    rig.send(["fwd@test.example"], sender="boss@example.net")
    assert rig.inbox("fwd") == []
    ((forwarded, body),) = rig.queued_to("one@elsewhere.example")
    assert [r.address for r in forwarded.recipients] == ["one@elsewhere.example", "two@elsewhere.example"]
    assert forwarded.sender == "boss@example.net"
    assert body.startswith(b"Delivered-To: fwd@test.example\r\n")


def test_forwarding_and_local_copy(rig: Rig) -> None:
    rig.send(["keep@test.example"])
    assert len(rig.inbox("keep")) == 1
    assert len(rig.queued_to("copy@elsewhere.example")) == 1


def test_delivered_to_loop_is_refused(rig: Rig) -> None:
    envelope = rig.submitter.accept(Draft(rig.submitter.new_id(), "a@example.net", ["alice@test.example"],
                                          b"Delivered-To: alice@test.example\r\nSubject: loop\r\n\r\nx\r\n"))
    rig.run(envelope)
    assert rig.inbox("alice") == []
    assert rig.marks(envelope) == [("failed", "5.4.6")]  # kept until the scheduler has bounced it


def test_quota_count_defers_and_whole_quota_fails(rig: Rig) -> None:
    first, second = rig.send(["small@test.example"]), rig.send(["small@test.example"])
    third = rig.submitter.accept(Draft(rig.submitter.new_id(), "a@example.net", ["small@test.example"], b"x\r\n"))
    rig.run(third)
    assert len(rig.inbox("small")) == 2 and first.id != second.id
    assert rig.marks(third) == [("deferred", "4.2.2")]
    big = rig.submitter.accept(Draft(rig.submitter.new_id(), "a@example.net", ["tiny@test.example"],
                                     b"Subject: big\r\n\r\n" + b"y" * 400 + b"\r\n"))
    delivery = rig.jobs.delivery
    outcome = delivery.deliver(big, 0, rig.submitter.map.spool(big.shard).body(big.id))
    assert (outcome.__class__.__name__, outcome.status) == ("Failed", "5.2.2")  # type: ignore[union-attr]


def test_size_max_fails_5_2_3(rig: Rig) -> None:
    envelope = rig.submitter.accept(Draft(rig.submitter.new_id(), "a@example.net", ["strict@test.example"],
                                          b"Subject: x\r\n\r\n" + b"z" * 300 + b"\r\n"))
    outcome = rig.jobs.delivery.deliver(envelope, 0, b"")
    assert (outcome.__class__.__name__, outcome.status) == ("Failed", "5.2.3")  # type: ignore[union-attr]
    assert rig.inbox("strict") == []


@pytest.mark.parametrize("user", ["esc1", "esc2", "esc3", "esc4", "link"])
def test_unsafe_message_stores_are_refused_and_nothing_written_outside(rig: Rig, user: str, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    rig.store.mkdir(exist_ok=True)
    (rig.store / "linked").symlink_to(outside)
    envelope = rig.submitter.accept(Draft(rig.submitter.new_id(), "a@example.net", [f"{user}@test.example"], b"x\r\n"))
    rig.run(envelope)
    assert rig.marks(envelope) == [("deferred", "4.3.5")]
    assert list(outside.iterdir()) == []
    assert sorted(p.name for p in rig.store.iterdir()) == ["linked"]
    assert not (tmp_path / "escape").exists() and not (tmp_path.parent / "escape").exists()
    assert not (tmp_path / "x").exists() and not Path("/etc/new").exists()


def test_mailhost_elsewhere_is_not_delivered_here(rig: Rig) -> None:
    envelope = rig.submitter.accept(Draft(rig.submitter.new_id(), "a@example.net", ["remote@test.example",
                                                                                      "here@test.example"], b"x\r\n"))
    rig.run(envelope)
    assert rig.inbox("remote") == [] and len(rig.inbox("here")) == 1
    assert rig.marks(envelope)[0][0] == "deferred"


def test_autoreply_once_per_sender_and_never_to_lists_or_null(rig: Rig) -> None:
    body = b"Subject: hello there\r\nMessage-ID: <m1@example.net>\r\n\r\nhi\r\n"
    rig.send(["away@test.example"], body=body, sender="friend@example.net")
    rig.send(["away@test.example"], body=body, sender="friend@example.net")
    replies = rig.queued_to("friend@example.net")
    assert len(replies) == 1 and len(rig.inbox("away")) == 2
    reply_env, reply_body = replies[0]
    assert reply_env.sender == ""
    parsed = email.message_from_bytes(reply_body)
    assert parsed["Auto-Submitted"] == "auto-replied"
    assert parsed["Subject"] == "Auto: hello there"
    assert parsed["In-Reply-To"] == "<m1@example.net>"
    assert "I am away until Monday." in parsed.get_payload()
    rig.send(["away@test.example"], body=body, sender="")
    rig.send(["away@test.example"], body=b"List-Id: <l.example.net>\r\nSubject: x\r\n\r\nx\r\n",
             sender="list@example.net")
    rig.send(["away@test.example"], body=b"Auto-Submitted: auto-generated\r\n\r\nx\r\n", sender="bot@example.net")
    rig.send(["away@test.example"], body=b"Precedence: bulk\r\n\r\nx\r\n", sender="news@example.net")
    assert [rig.queued_to(s) for s in ("list@example.net", "bot@example.net", "news@example.net")] == [[], [], []]


def test_racing_attempts_of_one_copy_end_with_one_file(rig: Rig) -> None:
    import threading

    envelope = rig.submitter.accept(Draft(rig.submitter.new_id(), "a@example.net", ["alice@test.example"], b"x\r\n"))
    body = rig.submitter.map.spool(envelope.shard).body(envelope.id)
    outcomes: list[object] = []
    threads = [threading.Thread(target=lambda: outcomes.append(rig.jobs.delivery.deliver(envelope, 0, body)))
               for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [type(o).__name__ for o in outcomes] == ["Delivered"] * 8
    assert len(rig.inbox("alice")) == 1
    assert list((rig.store / "alice" / "tmp").iterdir()) == []


def test_delivery_programs_run_without_shell_with_qmail_exit_codes(node_factory: Callable[..., Node],
                                                                    tmp_path: Path) -> None:
    rig = make_rig(node_factory, tmp_path, deliveryprograms="true", deliveryprogramuser="root",
                   deliveryprogramtimeout="1")
    rig.send(["prog@test.example"])
    assert (tmp_path / "program.out").read_bytes().startswith(b"Return-Path: <a@example.net>\nDelivered-To: prog@")
    assert len(rig.inbox("prog")) == 1  # a program does not replace the Maildir
    rcpts = ["prog99@test.example", "prog100@test.example", "prog111@test.example", "progslow@test.example",
             "progoff@test.example"]
    envelope = rig.submitter.accept(Draft(rig.submitter.new_id(), "a@example.net", rcpts, b"x\r\n"))
    body = rig.submitter.map.spool(envelope.shard).body(envelope.id)
    outcomes = [rig.jobs.delivery.deliver(envelope, i, body) for i in range(len(rcpts))]
    assert [(type(o).__name__, getattr(o, "status", "")) for o in outcomes] == [
        ("Delivered", "2.0.0"), ("Failed", "5.3.0"), ("Deferred", "4.3.0"), ("Deferred", "4.3.0"),
        ("Delivered", "2.0.0")]
    assert "no such list" in outcomes[1].text and "no answer within 1 s" in outcomes[3].text
    assert rig.inbox("prog99") == []  # 99: delivered, and no further delivery
    assert len(rig.inbox("progoff")) == 1


def test_delivery_programs_are_off_by_default(rig: Rig, tmp_path: Path) -> None:
    rig.send(["prog@test.example"])
    assert not (tmp_path / "program.out").exists()
    assert len(rig.inbox("prog")) == 1


def test_ldaplookup_shows_entry_and_plan(node_factory: Callable[..., Node], tmp_path: Path) -> None:
    rig = make_rig(node_factory, tmp_path)
    node = node_factory(users_ldif=str(tmp_path / "people.ldif"), ldapmessagestore=str(tmp_path / "mail"),
                        smtproutes="mx2.test.example:127.0.0.1:1")
    shown = node.command("ldaplookup", "-m", "robert@test.example")
    text = shown.stdout.decode()
    assert shown.returncode == 0, text
    assert "mail: bob@test.example" in text and f"maildir: {rig.store}/bob/" in text
    assert node.command("ldaplookup", "-m", "dis@test.example").returncode == 67
    assert "refuse: 5.2.1" in node.command("ldaplookup", "-m", "dis@test.example").stdout.decode()
    fwd = node.command("ldaplookup", "-u", "fwd").stdout.decode()
    assert "forward: one@elsewhere.example, two@elsewhere.example" in fwd and "maildir:" not in fwd
    remote = node.command("ldaplookup", "-m", "remote@test.example").stdout.decode()
    assert "cluster: hand over to mx2.test.example" in remote
    unsafe = node.command("ldaplookup", "-m", "esc1@test.example")
    assert unsafe.returncode == 75 and b"refuse to deliver" in unsafe.stdout
    assert node.command("ldaplookup", "-m", "dup@test.example").returncode == 75
    nobody = node.command("ldaplookup", "-m", "nobody@elsewhere.example")
    assert nobody.returncode == 67 and b"no entry" in nobody.stdout


def test_a_stock_rq_worker_runs_shardmail_jobs(rig: Rig, node_factory: Callable[..., Node],
                                               monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The jobs name a real function: rq's own SimpleWorker delivers them too (a fallback and a check
    that the job data are what rq expects)."""
    from rq import SimpleWorker
    from rq.serializers import JSONSerializer

    import workers.pool

    node = node_factory(users_ldif=str(tmp_path / "people.ldif"), ldapmessagestore=str(rig.store))
    for key, value in node.env.items():
        if key.startswith("SHARDMAIL_"):
            monkeypatch.setenv(key, value)
    monkeypatch.setattr(workers.pool, "_stock", None)
    settings = node.settings()
    submitter = Submitter(settings, connect(settings))
    envelope = submitter.accept(Draft(submitter.new_id(), "a@example.net", ["alice@test.example"], b"x\r\n"))
    queue = submitter.jobs.queue(envelope.shard, "local")
    assert queue.count == 1
    SimpleWorker([queue], connection=connect(settings), serializer=JSONSerializer).work(burst=True)
    assert len(rig.inbox("alice")) == 1 and queue.count == 0
    assert node.spooled() == []


def test_a_claimed_batch_commits_plain_copies_together_and_runs_the_rest_alone(
        node_factory: Callable[..., Node], tmp_path: Path) -> None:
    """The pool's batch path: plain Maildir copies staged and committed together (the cache knows
    the users), a forward, a quota user and an unknown address message by message; every entry
    final and gone, nothing staged left behind."""
    rig = make_rig(node_factory, tmp_path, ldapcachettl="60", ldapnegcachettl="60")
    plain = [rig.submitter.accept(Draft(rig.submitter.new_id(), "a@example.net", rcpts,
                                        b"Subject: hi\r\n\r\nhello\r\n"))
             for rcpts in (["alice@test.example"], ["bob@test.example", "alice@test.example"])]
    rig.send(["alice@test.example"])  # the cache now knows alice (the batch below finds her plain)
    rig.jobs.delivery.directory.lookup("bob@test.example")
    others = [rig.submitter.accept(Draft(rig.submitter.new_id(), "a@example.net", rcpts, b"Subject: x\r\n\r\nx\r\n"))
              for rcpts in (["keep@test.example"], ["small@test.example"], ["del@test.example"])]
    claims = [Claim(f"{e.id}-local", e.id, e.shard, "local", "x") for e in [*plain, *others]]
    # entries removed here need no settling (their claims say so); the failed one waits for its bounce
    assert rig.jobs(claims) == [replace(c, settle=False) for c in claims[:4]] + claims[4:]
    assert len(rig.inbox("alice")) == 3 and len(rig.inbox("bob")) == 1
    assert len(rig.inbox("keep")) == 1 and len(rig.queued_to("copy@elsewhere.example")) == 1
    assert len(rig.inbox("small")) == 1
    for envelope in [*plain, *others[:2]]:  # every recipient delivered: entries gone
        assert rig.marks(envelope) == []
    assert rig.marks(others[2]) == [("failed", "5.1.1")]  # kept for the scheduler's bounce
    assert list((rig.store / "alice" / "tmp").iterdir()) == []
    again = rig.jobs([claims[0]])  # a repeated attempt of a delivered message: its entry is gone
    assert again == [claims[0]] and len(rig.inbox("alice")) == 3
