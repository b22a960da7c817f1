"""Users from a real OpenLDAP slapd: lookups, filter injection, and the directory being down or hung
(RCPT-time 451 4.4.3 within ldaptimeout + 1 s; deferral in the local pool)."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from core.config import load
from core.directory import AmbiguousAddress, DirectoryUnavailable, LdapBackend, open_directory
from core.outcome import Deferred
from core.redis_conn import connect
from core.submit import Draft, Submitter
from tests.conftest import Conversation, Node
from tests.slapd import Slapd
from workers.local import LocalDelivery


def ldap_env(server: Slapd, **extra: str) -> dict[str, str]:
    env = {"SHARDMAIL_LDAPSERVER": server.url, "SHARDMAIL_LDAPBASEDN": server.base_dn,
           "SHARDMAIL_LDAPTIMEOUT": "2", "SHARDMAIL_LDAPCACHETTL": "0", "SHARDMAIL_LDAPNEGCACHETTL": "0"}
    env.update({f"SHARDMAIL_{k.upper()}": v for k, v in extra.items()})
    return env


def test_lookup_rounds_against_slapd(slapd: Slapd) -> None:
    directory = open_directory(load(env=ldap_env(slapd)))
    assert directory.lookup("alice@test.example").uid == "alice"  # type: ignore[union-attr]
    assert directory.lookup("ROBERT@Test.Example").mail == "bob@test.example"  # type: ignore[union-attr]
    assert directory.lookup("bob@alias.example").uid == "bob"  # type: ignore[union-attr]
    assert directory.lookup("sales-north-2@test.example").uid == "sales-catchall"  # type: ignore[union-attr]
    assert directory.lookup("nobody@test.example").uid == "catchall"  # type: ignore[union-attr]
    assert directory.lookup("nobody@alias.example") is None
    carol = directory.lookup("carol@test.example")
    assert carol is not None and carol.status == "disabled"
    ivan = directory.lookup("ivan@test.example")
    assert ivan is not None and ivan.size_max == 2000
    with pytest.raises(AmbiguousAddress):
        directory.lookup("dup@test.example")


@pytest.mark.parametrize("hostile", ["*@test.example", "alice@test.example)(mail=*", "*", "a*e@test.example",
                                     "alice@test.example\\", "(mail=alice@test.example)", "alice@test.example\x00x",
                                     "*)(|(uid=*"])
def test_filter_injection_never_matches_another_entry(slapd: Slapd, hostile: str) -> None:
    backend = LdapBackend(load(env=ldap_env(slapd)))
    assert backend.search(hostile) == []


def test_objectclass_restriction(slapd: Slapd) -> None:
    backend = LdapBackend(load(env=ldap_env(slapd, ldapobjectclass="qmailUser")))
    assert [u.uid for u in backend.search("alice@test.example")] == ["alice"]
    other = LdapBackend(load(env=ldap_env(slapd, ldapobjectclass="posixAccount")))
    assert other.search("alice@test.example") == []


def test_directory_down_is_temporary_everywhere(slapd_fresh: Slapd, node_factory: Callable[..., Node]) -> None:
    node = node_factory(locals="test.example,alias.example",
                        **{k[len("SHARDMAIL_"):].lower(): v for k, v in ldap_env(slapd_fresh).items()})
    node.start_smtpd()
    c = Conversation(node.port)
    c.cmd("EHLO client.example")
    c.cmd("MAIL FROM:<a@example.net>")
    assert c.cmd("RCPT TO:<alice@test.example>").startswith("250 2.1.5")
    assert c.cmd("RCPT TO:<carol@test.example>").startswith("550 5.2.1")
    assert c.cmd("RCPT TO:<dave@test.example>").startswith("550 5.1.1")
    assert c.cmd("RCPT TO:<nobody@alias.example>").startswith("550 5.1.1")
    settings = node.settings()
    submitter = Submitter(settings, connect(settings))
    envelope = submitter.accept(Draft(submitter.new_id(), "a@example.net", ["alice@test.example"], b"x\r\n"))
    slapd_fresh.stop()
    assert c.cmd("RCPT TO:<heidi@test.example>").startswith("451 4.4.3")
    delivery = LocalDelivery(settings, open_directory(settings), submitter, connect(settings))
    outcome = delivery.deliver(envelope, 0, b"x\r\n")
    assert isinstance(outcome, Deferred) and outcome.status == "4.4.3"
    with pytest.raises(DirectoryUnavailable):
        LdapBackend(settings).search("alice@test.example")
    slapd_fresh.start()
    assert c.cmd("RCPT TO:<heidi@test.example>").startswith("250 2.1.5")
    c.close()


def test_hung_directory_answers_within_timeout(slapd_fresh: Slapd, node_factory: Callable[..., Node]) -> None:
    node = node_factory(**{k[len("SHARDMAIL_"):].lower(): v for k, v in ldap_env(slapd_fresh).items()})
    node.start_smtpd()
    c = Conversation(node.port, timeout=20)
    c.cmd("EHLO client.example")
    c.cmd("MAIL FROM:<a@example.net>")
    assert c.cmd("RCPT TO:<alice@test.example>").startswith("250")
    slapd_fresh.pause()
    try:
        started = time.monotonic()
        reply = c.cmd("RCPT TO:<heidi@test.example>")
        elapsed = time.monotonic() - started
    finally:
        slapd_fresh.resume()
    assert reply.startswith("451 4.4.3"), reply
    assert elapsed < 2 + 1, elapsed  # ldaptimeout + 1 s
    c.close()


def test_failover_to_the_next_server_and_refused_bind(slapd: Slapd) -> None:
    from tests.conftest import free_port
    from tests.slapd import ADMIN_DN, ADMIN_PASSWORD

    dead = f"ldap://127.0.0.1:{free_port()}"
    env = ldap_env(slapd)
    env["SHARDMAIL_LDAPSERVER"] = f"{dead},{slapd.url}"
    assert [u.uid for u in LdapBackend(load(env=env)).search("alice@test.example")] == ["alice"]
    bound = LdapBackend(load(env=dict(env, SHARDMAIL_LDAPLOGIN=ADMIN_DN, SHARDMAIL_LDAPPASSWORD=ADMIN_PASSWORD)))
    assert [u.uid for u in bound.search("alice@test.example")] == ["alice"]
    refused = LdapBackend(load(env=dict(env, SHARDMAIL_LDAPLOGIN=ADMIN_DN, SHARDMAIL_LDAPPASSWORD="wrong")))
    with pytest.raises(DirectoryUnavailable):
        refused.search("alice@test.example")
