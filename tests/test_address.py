"""core.address: mailbox syntax (strict where a loose parser would open a relay), domain matching, header cleaning."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.address import check_domain, check_mailbox, clean_for_header, domain_matches, domain_of, routes_elsewhere


@pytest.mark.parametrize(
    "address",
    [
        "user@example.com",
        "first.last+tag@sub.example.co.uk",
        "o'brien@example.com",
        "x@a-b.example",
        '"john doe"@example.com',
        '"with\\"escaped"@example.com',
        '"a@b"@example.com',
        "user@[192.0.2.1]",
        "user@[IPv6:2001:db8::1]",
        "user@[ipv6:::1]",
        "user@example.com.",
        "a" * 64 + "@example.com",
    ],
)
def test_accepts_valid_mailboxes(address: str) -> None:
    assert check_mailbox(address) is None


@pytest.mark.parametrize(
    "address",
    [
        "@a:b@c.example",
        "@relay.example,@other.example:user@c.example",
        "no-at-sign",
        "@example.com",
        "",
        "a" * 65 + "@example.com",
        "us\x00er@example.com",
        "user\r\n@example.com",
        "us\x7fer@example.com",
        "user@exa mple.com",
        "us er@example.com",
        "user@-example.com",
        "user@example..com",
        "a..b@example.com",
        ".a@example.com",
        "user@[300.1.2.3]",
        "user@[IPv6:not::an::address]",
        "user@",
        "user@.",
    ],
)
def test_refuses_malformed_and_routing_tricks(address: str) -> None:
    assert check_mailbox(address) is not None
    assert check_mailbox(address, smtputf8=True) is not None


def test_source_route_reason_is_explicit() -> None:
    assert "source route" in (check_mailbox("@a:b@c") or "")


@pytest.mark.parametrize("address", ["host!user@example.com", '"host!user"@example.com',
                                     "user%other.example@example.com", '"user%other"@example.com',
                                     '"user@other.example"@example.com'])
def test_routes_in_the_local_part_are_syntax_but_routes(address: str) -> None:
    """Valid syntax (an authenticated client may send them on), marked for the relay check."""
    assert check_mailbox(address) is None
    assert routes_elsewhere(address)


def test_plain_addresses_do_not_route_elsewhere() -> None:
    assert not routes_elsewhere("user@example.com")
    assert not routes_elsewhere('"odd user"@example.com')


@pytest.mark.parametrize("address", ["jörg@example.com", "user@exämple.com", "用户@例子.广告"])
def test_eight_bit_needs_smtputf8(address: str) -> None:
    assert "SMTPUTF8" in (check_mailbox(address) or "")
    assert check_mailbox(address, smtputf8=True) is None


def test_overlong_address_refused() -> None:
    assert check_mailbox("a@" + ".".join(["b" * 60] * 5)) is not None


def test_domain_of() -> None:
    assert domain_of("User@Example.COM.") == "example.com"
    assert domain_of("postmaster") == ""
    assert domain_of('"a@b"@c.example') == "c.example"


def test_check_domain_literals() -> None:
    assert check_domain("[127.0.0.1]") is None
    assert check_domain("[IPv6:::1]") is None
    assert check_domain("[::1]") is not None


def test_domain_matches_exact_and_case_insensitive() -> None:
    assert domain_matches("example.com", ["example.com"])
    assert domain_matches("EXAMPLE.com", ["Example.COM"])
    assert domain_matches("example.com.", ["example.com"])
    assert not domain_matches("a.example.com", ["example.com"])
    assert not domain_matches("example.org", ["example.com"])
    assert not domain_matches("example.com", [])


def test_domain_matches_dot_entry_means_subdomains_only() -> None:
    assert domain_matches("a.example.com", [".example.com"])
    assert domain_matches("deep.A.Example.Com", [".EXAMPLE.com"])
    assert not domain_matches("example.com", [".example.com"])
    assert not domain_matches("badexample.com", [".example.com"])


@pytest.mark.parametrize("text", ["evil\r\nBcc: x@y", "a b\tc", "line\nbreak", "\x00\x1f\x7f", "ünïcode", "x" * 500])
def test_clean_for_header_leaves_no_cr_lf_or_space(text: str) -> None:
    cleaned = clean_for_header(text)
    assert not any(c in cleaned for c in "\r\n \t")
    assert len(cleaned) <= 200


def test_clean_for_header_keeps_printable_ascii() -> None:
    assert clean_for_header("mx.example.com[192.0.2.1]") == "mx.example.com[192.0.2.1]"
    assert clean_for_header("a b", limit=2) == "a?"


@given(st.text(), st.integers(min_value=0, max_value=300))
def test_clean_for_header_output_is_printable_ascii_without_whitespace(text: str, limit: int) -> None:
    cleaned = clean_for_header(text, limit)
    assert all("\x21" <= c <= "\x7e" for c in cleaned)
    assert len(cleaned) == min(len(text), limit)


_ATOM = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789+-_=", min_size=1, max_size=10)
_LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)


@given(st.lists(_ATOM, min_size=1, max_size=4), st.lists(_LABEL, min_size=1, max_size=4))
def test_generated_dot_atom_addresses_are_accepted(local: list[str], labels: list[str]) -> None:
    address = ".".join(local)[:64] + "@" + ".".join(labels)
    if address.split("@")[0].endswith("."):
        return
    assert check_mailbox(address) is None
    assert domain_of(address) == ".".join(labels)


@given(st.text(max_size=80), st.booleans())
def test_check_mailbox_never_raises_and_refuses_controls(address: str, smtputf8: bool) -> None:
    result = check_mailbox(address, smtputf8)
    assert result is None or isinstance(result, str)
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in address) or "@" not in address:
        assert result is not None
