"""The private slapd works: the test data loads under the qmailUser schema, the schema refuses what
qmail-ldap would, and pause() makes the server hang the way a stuck directory does."""

from __future__ import annotations

import time

import ldap3
import pytest
from ldap3.core import results
from ldap3.core.exceptions import LDAPException
from ldap3.utils.conv import escape_filter_chars

from tests.slapd import PEOPLE, SUFFIX, USERS_LDIF, Slapd, parse_ldif

ADDRESS_FILTER = "(|(mail={0})(mailAlternateAddress={0}))"


def _find(server: Slapd, address: str) -> list[ldap3.Entry]:
    conn = server.connection()
    try:
        conn.search(SUFFIX, ADDRESS_FILTER.format(address), attributes=[ldap3.ALL_ATTRIBUTES])
        return list(conn.entries)
    finally:
        conn.unbind()


def test_anonymous_lookup_finds_alice_with_qmailuser_attributes(slapd: Slapd) -> None:
    entries = _find(slapd, "alice@test.example")
    assert len(entries) == 1
    alice = entries[0]
    assert alice.entry_dn == f"uid=alice,{PEOPLE}"
    assert set(alice.objectClass.values) >= {"inetOrgPerson", "qmailUser"}
    assert alice.mailMessageStore.value == "alice/"
    assert alice.accountStatus.value == "active"


def test_test_data_lookup_cases(slapd: Slapd) -> None:
    assert [e.entry_dn for e in _find(slapd, "bob@alias.example")] == [f"uid=bob,{PEOPLE}"]
    assert len(_find(slapd, "dup@test.example")) == 2
    assert _find(slapd, escape_filter_chars("*@test.example")) == []
    assert len(_find(slapd, "*@test.example")) > 2  # unescaped, the same text is a wildcard
    grace = _find(slapd, "grace@test.example")[0]
    assert grace.mailReplyText.value == "I am away until Monday.\nYour message will be read when I am back.\n"
    heidi = _find(slapd, "heidi@test.example")[0]
    # no schema read by the client (get_info=NONE), so integers arrive as strings
    assert (heidi.mailQuotaSize.value, heidi.mailQuotaCount.value) == ("10000", "3")


def test_every_data_entry_is_loaded(slapd: Slapd) -> None:
    expected = {dn.lower() for dn, _ in parse_ldif(USERS_LDIF.read_text())}
    conn = slapd.connection()
    try:
        conn.search(SUFFIX, "(objectClass=*)", attributes=[])
        assert {e.entry_dn.lower() for e in conn.entries} == expected
    finally:
        conn.unbind()


@pytest.mark.parametrize(("extra", "code"), [
    ("mailFavouriteColour: blue", "undefinedAttributeType"),
    ("mailHost: a.test.example\nmailHost: b.test.example", "constraintViolation"),
    ("mailQuotaSize: lots", "invalidAttributeSyntax"),
])
def test_schema_refuses_bad_entries(slapd_fresh: Slapd, extra: str, code: str) -> None:
    ldif = f"""dn: uid=mallory,{PEOPLE}
objectClass: inetOrgPerson
objectClass: qmailUser
uid: mallory
cn: Mallory
sn: Mallory
mail: mallory@test.example
{extra}
"""
    with pytest.raises(LDAPException) as refused:
        slapd_fresh.add(ldif)
    assert refused.value.result == getattr(results, f"RESULT_{_constant(code)}")
    assert _find(slapd_fresh, "mallory@test.example") == []


def test_qmailuser_requires_mail(slapd_fresh: Slapd) -> None:
    with pytest.raises(LDAPException, match="mail"):
        slapd_fresh.add(f"dn: uid=nomail,{PEOPLE}\nobjectClass: inetOrgPerson\nobjectClass: qmailUser\n"
                        "uid: nomail\ncn: No Mail\nsn: Mail\n")


def test_add_and_modify_at_run_time(slapd_fresh: Slapd) -> None:
    slapd_fresh.add(f"dn: uid=new,{PEOPLE}\nobjectClass: inetOrgPerson\nobjectClass: qmailUser\n"
                    "uid: new\ncn: New\nsn: New\nmail: new@test.example\nmailMessageStore: new/\n")
    assert len(_find(slapd_fresh, "new@test.example")) == 1
    slapd_fresh.modify(f"uid=alice,{PEOPLE}", replace={"accountStatus": "disabled"},
                       add={"mailAlternateAddress": ["ally@test.example"]})
    alice = _find(slapd_fresh, "ally@test.example")[0]
    assert alice.accountStatus.value == "disabled"
    slapd_fresh.delete(f"uid=new,{PEOPLE}")
    assert _find(slapd_fresh, "new@test.example") == []


def test_pause_makes_searches_time_out_and_resume_recovers(slapd_fresh: Slapd) -> None:
    conn = slapd_fresh.connection(timeout=1)
    slapd_fresh.pause()
    try:
        started = time.monotonic()
        with pytest.raises(LDAPException):
            conn.search(SUFFIX, ADDRESS_FILTER.format("alice@test.example"))
        assert time.monotonic() - started < 5
    finally:
        slapd_fresh.resume()
    assert len(_find(slapd_fresh, "alice@test.example")) == 1


def test_stop_and_start_keep_port_and_data(slapd_fresh: Slapd) -> None:
    url = slapd_fresh.url
    slapd_fresh.modify(f"uid=bob,{PEOPLE}", delete={"mailAlternateAddress": ["robert@test.example"]})
    slapd_fresh.stop()
    with pytest.raises(LDAPException):
        slapd_fresh.connection(timeout=1)
    slapd_fresh.start()
    assert slapd_fresh.url == url
    assert _find(slapd_fresh, "robert@test.example") == []


def _constant(code: str) -> str:
    """ldap3 names result codes RESULT_UNDEFINED_ATTRIBUTE_TYPE for undefinedAttributeType."""
    return "".join(f"_{c}" if c.isupper() else c.upper() for c in code)
