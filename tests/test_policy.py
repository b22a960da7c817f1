"""ingress.policy: badmailfrom, badrcptto and relaymailfrom matching (pure), and their config checks."""

from __future__ import annotations

import pytest

from core.config import ConfigError, load
from ingress.policy import AddressList, Policy


def policy(**lists: str) -> Policy:
    env = {f"SHARDMAIL_{key.upper()}": value for key, value in lists.items()}
    return Policy(load(env=env | {"SHARDMAIL_ME": "mx"}))


ENTRIES = ["Spammer@Example.COM", "@bad.example", ".evil.example", "@.worse.example", "postmaster"]


@pytest.mark.parametrize("address", [
    "spammer@example.com", "SPAMMER@example.com", "spammer@EXAMPLE.com.",  # case, trailing dot
    "anyone@bad.example", "x@BAD.EXAMPLE.",
    "a@mx.evil.example", "a@deep.mx.evil.example", "a@sub.worse.example",  # subdomains
    "PostMaster",  # an entry without a domain: RCPT TO:<postmaster>
])
def test_listed(address: str) -> None:
    assert AddressList.of(ENTRIES).matches(address)


@pytest.mark.parametrize("address", [
    "spammer@example.org", "other@example.com", "spammer@sub.example.com",  # exact addresses are exact
    "a@sub.bad.example", "a@notbad.example",  # @domain is that domain only
    "a@evil.example", "a@worse.example", "a@notevil.example", "a@xevil.example",  # .domain: subdomains only
    "postmaster@example.com", "", "<>", "evil.example", "@evil.example",
])
def test_not_listed(address: str) -> None:
    assert not AddressList.of(ENTRIES).matches(address)


def test_international_domains_match_in_either_form() -> None:
    unicode_entries = AddressList.of(["@bücher.example", ".Straße.example", "Jörg@xn--mnchen-3ya.example"])
    assert unicode_entries.matches("a@xn--bcher-kva.example")
    assert unicode_entries.matches("a@BÜCHER.example.")
    assert unicode_entries.matches("a@mx.strasse.example")  # IDNA 2003 maps ß to ss, as Python's codec does
    assert unicode_entries.matches("jörg@münchen.example")
    assert not unicode_entries.matches("jorg@münchen.example")
    a_label_entries = AddressList.of(["@xn--bcher-kva.example"])
    assert a_label_entries.matches("x@bücher.example")


def test_a_domain_that_is_no_valid_idna_name_still_matches_itself() -> None:
    odd = "a@" + "ü" * 70 + ".example"  # a label too long for IDNA
    assert AddressList.of([odd]).matches(odd.upper())


def test_null_sender_only_with_an_explicit_entry() -> None:
    assert not policy(badmailfrom="@example.com,.example.com").bad_sender("")
    listed = policy(badmailfrom="<>")
    assert listed.bad_sender("") and listed.bad_sender("<>")
    assert not listed.bad_sender("a@example.com")


def test_policy_reads_each_list_from_settings() -> None:
    p = policy(badmailfrom="@spam.example", badrcptto="trap@ours.example,.gone.example",
               relaymailfrom="@partner.example")
    assert p.bad_sender("x@SPAM.example") and not p.bad_sender("x@ours.example")
    assert p.bad_recipient("Trap@ours.example") and p.bad_recipient("a@old.gone.example")
    assert not p.bad_recipient("x@ours.example") and not p.bad_recipient("x@spam.example")
    assert p.relay_sender("boss@partner.example") and not p.relay_sender("boss@partner.example.org")
    assert not p.relay_sender("")


def test_empty_lists_match_nothing() -> None:
    p = policy()
    assert not p.badmailfrom and not p.badrcptto and not p.relaymailfrom
    assert not any(f(a) for f in (p.bad_sender, p.bad_recipient, p.relay_sender) for a in ("", "a@b.example"))


@pytest.mark.parametrize(("key", "value"), [
    ("badmailfrom", "example.com"), ("badmailfrom", "@"), ("badrcptto", "user@"), ("badrcptto", "."),
    ("badrcptto", "a b@example.com"), ("badmailfrom", "<a@example.com>"), ("relaymailfrom", "<>"),
])
def test_malformed_entries_are_config_errors(key: str, value: str) -> None:
    with pytest.raises(ConfigError, match=key):
        load(env={f"SHARDMAIL_{key.upper()}": value, "SHARDMAIL_ME": "mx"})


def test_a_big_list_matches_by_set_look_ups() -> None:
    entries = [f"user{n}@domain{n % 1000}.example" for n in range(50_000)] + [f".zone{n}.example" for n in range(1000)]
    big = AddressList.of(entries)
    assert big.matches("USER49999@domain999.example") and big.matches("x@a.b.zone7.example")
    assert not big.matches("user1@domain2.example")
