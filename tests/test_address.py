"""core.address: the RFC 5321 path grammar (property tests against it, and the malformed forms tried), mailbox
syntax (strict where a loose parser would open a relay), domain matching, header cleaning."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.address import (
    Path,
    check_domain,
    check_mailbox,
    clean_for_header,
    domain_matches,
    domain_of,
    parse_path,
    routes_elsewhere,
)


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


# --- parse_path: RFC 5321 4.1.2 Path, exactly ---------------------------------------------------------------------

VALID_PATHS = [
    ("<user@example.com>", "user@example.com", ""),
    ("<user@example.com> SIZE=1000 BODY=8BITMIME", "user@example.com", "SIZE=1000 BODY=8BITMIME"),
    ("<first.last+tag@sub.example.co.uk>", "first.last+tag@sub.example.co.uk", ""),
    ("<!#$%&'*+/=?^_`{|}~-@example.com>", "!#$%&'*+/=?^_`{|}~-@example.com", ""),
    ('<"a b"@example.com>', '"a b"@example.com', ""),  # kept quoted, never rewritten
    ('<"a\\"b"@example.com>', '"a\\"b"@example.com', ""),
    ('<""@example.com>', '""@example.com', ""),
    ('<"a@b"@example.com>', '"a@b"@example.com', ""),
    ("<user@[192.0.2.1]>", "user@[192.0.2.1]", ""),
    ("<user@[IPv6:2001:db8::1]>", "user@[IPv6:2001:db8::1]", ""),
    ("<user@[ipv6:::1]>", "user@[ipv6:::1]", ""),
    ("<user@[IPv6:::ffff:192.0.2.1]>", "user@[IPv6:::ffff:192.0.2.1]", ""),
    ("<user@[IPv6:1:2:3:4:5:6:7:8]>", "user@[IPv6:1:2:3:4:5:6:7:8]", ""),
    ("<user@[IPv6:1:2:3:4:5:6:192.0.2.1]>", "user@[IPv6:1:2:3:4:5:6:192.0.2.1]", ""),
    ("<user@[x-tag:anything~goes]>", "user@[x-tag:anything~goes]", ""),  # General-address-literal
    ("<@relay.example,@other.example:user@c.example>", "user@c.example", ""),  # the route is dropped
    ("<user@example.com.>", "user@example.com.", ""),  # the root's dot: the project's one leniency
    ("<" + "a" * 64 + "@example.com>", "a" * 64 + "@example.com", ""),
    ("<1@2>", "1@2", ""),
]


@pytest.mark.parametrize(("text", "mailbox", "params"), VALID_PATHS)
def test_parse_path_accepts_the_grammar_and_returns_the_mailbox_as_sent(text: str, mailbox: str, params: str) -> None:
    path = parse_path(text)
    assert isinstance(path, Path), path
    assert (path.mailbox, path.params) == (mailbox, params)


def test_parse_path_keeps_the_dropped_route() -> None:
    assert parse_path("<@a.example,@b.example:u@c.example>") == Path("u@c.example", "", "@a.example,@b.example")


def test_null_path_only_where_allowed() -> None:
    assert parse_path("<>", null=True) == Path("", "")
    assert parse_path("<> SIZE=10", null=True) == Path("", "SIZE=10")
    assert isinstance(parse_path("<>"), str)
    assert isinstance(parse_path("<>x", null=True), str)
    assert isinstance(parse_path("<>  SIZE=10", null=True), str)


def test_bare_postmaster_only_where_allowed() -> None:
    """RFC 5321 4.1.1.3 and 4.5.1: RCPT TO:<Postmaster> (any case, no domain) must be taken."""
    assert parse_path("<Postmaster>", postmaster=True) == Path("Postmaster", "")
    assert parse_path("<postMASTER> X=1", postmaster=True) == Path("postMASTER", "X=1")
    assert isinstance(parse_path("<Postmaster>"), str)
    assert isinstance(parse_path("<webmaster>", postmaster=True), str)


def test_eight_bit_needs_smtputf8_in_the_parameters_or_the_transaction() -> None:
    assert parse_path("<jörg@exämple.com> SMTPUTF8") == Path("jörg@exämple.com", "SMTPUTF8")
    assert parse_path("<jörg@exämple.com> smtputf8 SIZE=1") == Path("jörg@exämple.com", "smtputf8 SIZE=1")
    assert parse_path("<jörg@exämple.com>") == "8-bit address without SMTPUTF8"
    assert parse_path("<jörg@exämple.com> SMTPUTF8", smtputf8=False) == "8-bit address without SMTPUTF8"
    assert parse_path("<用户@例子.广告>", smtputf8=True) == Path("用户@例子.广告", "")
    assert parse_path('<"jö rg"@example.com>', smtputf8=True) == Path('"jö rg"@example.com', "")


def test_limits_count_octets_in_utf8() -> None:
    assert isinstance(parse_path("<" + "ö" * 32 + "@example.com>", smtputf8=True), Path)  # 64 octets
    assert parse_path("<" + "ö" * 33 + "@example.com>", smtputf8=True) == "local part over 64 octets"


# The malformed forms tried: (text after MAIL FROM: / RCPT TO:, what it shows). Each is refused by parse_path
# with and without SMTPUTF8, as a sender (null allowed) and as a recipient (Postmaster allowed). What follows
# "> " is aiosmtpd's to parse as parameters (``<a@b> <c@d>`` is refused there: tests/test_smtp_paths.py).
_LONG_DOMAIN = ".".join(["d" * 63] * 4)  # 255 octets
MALFORMED = [
    ("<a@b", "missing >"),
    ("<postmaster@localhost", "missing > (the issue's example)"),
    ("a@b>", "missing <"),
    ("a@b", "no brackets at all"),
    ("", "empty"),
    ("<", "only <"),
    ("<@>", "nothing around @"),
    ("<a@>", "empty domain"),
    ("<@b>", "empty local part"),
    ("<ab>", "no @ (and not Postmaster)"),
    ("<a b@c>", "space in the local part (the issue's example: never rewritten to \"a b\"@c)"),
    ("< a@b>", "space after <"),
    ("<a@b >", "space before >"),
    ("<a@ b>", "space after @"),
    ("<a @b>", "space before @"),
    ("<a(b)@c>", "unquoted ( )"),
    ("<a,b@c>", "unquoted ,"),
    ("<a;b@c>", "unquoted ;"),
    ("<a:b@c>", "unquoted :"),
    ("<a[b]@c>", "unquoted [ ]"),
    ('<a"b@c>', "unquoted \""),
    ("<a\\b@c>", "unquoted backslash"),
    ("<a@b@c>", "two @"),
    ("<a..b@c>", "double dot in the local part"),
    ("<.a@c>", "leading dot in the local part"),
    ("<a.@c>", "trailing dot in the local part"),
    ("<a@b..c>", "double dot in the domain"),
    ("<a@.b>", "leading dot in the domain"),
    ("<a@b..>", "two root dots"),
    ("<a@.>", "only the root dot"),
    ("<a@-b.c>", "label starting with -"),
    ("<a@b-.c>", "label ending with -"),
    ("<a@b_c.d>", "_ in a domain"),
    ("<a@b,c>", ", in a domain"),
    ("<" + "a" * 65 + "@b.example>", "local part over 64 octets"),
    ("<a@" + _LONG_DOMAIN + "d>", "domain over 255 octets"),
    ("<" + "a" * 64 + "@" + ".".join(["d" * 63] * 3) + ">", "path over 256 octets"),
    ("<@" + _LONG_DOMAIN[:200] + ":" + "a" * 20 + "@" + "d" * 40 + ">", "path over 256 octets with its route"),
    ("<a@[300.1.2.3]>", "IPv4 literal octet over 255"),
    ("<a@[1.2.3]>", "IPv4 literal with three parts"),
    ("<a@[1.2.3.4.5]>", "IPv4 literal with five parts"),
    ("<a@[1.2.3.4>", "literal without ]"),
    ("<a@1.2.3.4]>", "literal without ["),
    ("<a@[]>", "empty literal"),
    ("<a@[::1]>", "IPv6 without its tag"),
    ("<a@[IPv6:1::2::3]>", "two ::"),
    ("<a@[IPv6:12345::]>", "IPv6 group of five digits"),
    ("<a@[IPv6:fe80::1%eth0]>", "IPv6 zone index"),
    ("<a@[IPv6:1:2:3:4:5:6:7::]>", ":: for one group (RFC 5321 allows at most 6 beside it)"),
    ("<a@[IPv6:1:2:3:4:5:6:7]>", "IPv6 with seven groups"),
    ("<a@[IPv6:1:2:3:4:5:6:7:8:9]>", "IPv6 with nine groups"),
    ("<a@[IPv6:::1.2.3.400]>", "bad IPv4 tail"),
    ("<a@[IPv6:g::1]>", "IPv6 non-hex"),
    ("<a@[x-tag:]>", "general literal without dcontent"),
    ("<a@[:x]>", "general literal without tag"),
    ("<a@[-:x]>", "general literal tag ending with -"),
    ("<a@[x-tag:a b]>", "space in dcontent"),
    ("<a@[x-tag:a\\b]>", "backslash in dcontent"),
    ("<a\x00b@c>", "NUL"),
    ("<a\tb@c>", "TAB"),
    ("<a\rb@c>", "CR"),
    ("<a@b\x7f>", "DEL"),
    ("<a\x85b@c>", "C1 control (NEL)"),
    ('<"a\x01"@b>', "control in a quoted string"),
    ('<"a\\\x00"@b>', "quoted-pair of NUL (SMTP allows only %d32-126)"),
    ('<"a@b>', "unterminated quoted string"),
    ('<"a\\"@b>', "quoted string whose closing quote is escaped"),
    ('<"a"b"@c>', "quote inside a quoted string"),
    ('<"a".b@c>', "quoted string and atom mixed (RFC 5322 obs, not SMTP)"),
    ("<<a@b>>", "doubled brackets"),
    ("<<a@b>", "doubled <"),
    ("<a@b>>", "doubled >"),
    ("<a@b>x", "trailing garbage without SP"),
    ("<a@b>SIZE=1", "parameters without SP"),
    ("<a@b>\tSIZE=1", "TAB before the parameters"),
    ("<a@b>  SIZE=1", "two SP before the parameters"),
    ("<a@b> ", "SP and no parameter"),
    ("<a@b> SIZE=1\x00", "NUL in the parameters"),
    ("(comment)<a@b>", "leading RFC 5322 comment"),
    ("Name <a@b>", "RFC 5322 display name"),
    ("<@a:>", "route without mailbox"),
    ("<@a:b>", "route and a mailbox without @"),
    ("<@a,b:c@d>", "route element without @"),
    ("<@a;@b:c@d>", "route separated by ;"),
    ("<@a,@b c@d>", "route without :"),
    ("<@[192.0.2.1]:c@d>", "address literal in a route"),
    ("<@a.:c@d>", "root dot in a route"),
    ("<Postmaster@>", "postmaster with empty domain"),
    ("<Post master>", "spaced postmaster"),
]


@pytest.mark.parametrize(("text", "why"), MALFORMED, ids=[why for _, why in MALFORMED])
def test_parse_path_refuses_the_malformed_forms(text: str, why: str) -> None:
    for smtputf8 in (None, False, True):
        for role in ({"null": True}, {"postmaster": True}):
            result = parse_path(text, smtputf8, **role)
            assert isinstance(result, str) and result, (text, smtputf8, role, result)


@pytest.mark.parametrize("text", ["<jörg@example.com>", "<a@exämple.com>", '<"jö"@x.example>'])
def test_parse_path_refuses_eight_bit_without_smtputf8(text: str) -> None:
    assert parse_path(text, null=True) == "8-bit address without SMTPUTF8"
    assert parse_path(text, smtputf8=False) == "8-bit address without SMTPUTF8"
    assert isinstance(parse_path(text, smtputf8=True), Path)


@pytest.mark.parametrize(("text", "reason"), [
    ("<a@b", "must end with >"), ("a@b>", "must start with <"), ("<a b@c>", "space"), ("<a..b@c>", "dots"),
    ("<a\x00b@c>", "control"), ("<a@b>x", "after >"), ("<<a@b>>", "< inside"), ("<a@[1.2.3]>", "literal"),
    ("<a@[IPv6:1::2::3]>", "IPv6"), ("<" + "a" * 65 + "@b>", "64 octets"), ("<>", "only for MAIL"),
])
def test_parse_path_says_why(text: str, reason: str) -> None:
    result = parse_path(text)
    assert isinstance(result, str) and reason in result, result


@given(st.text(max_size=300), st.sampled_from([None, False, True]), st.booleans(), st.booleans())
def test_parse_path_never_raises(text: str, smtputf8: bool | None, null: bool, postmaster: bool) -> None:
    result = parse_path(text, smtputf8, null, postmaster)
    assert isinstance(result, (Path, str))
    if isinstance(result, Path):
        assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in result.mailbox)
        assert len(("<" + result.mailbox + ">").encode()) <= 256


# Generators straight from the ABNF of RFC 5321 4.1.2 / 4.1.3.
_ATEXT = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+/=?^_`{|}~-"
_atom = st.text(alphabet=_ATEXT, min_size=1, max_size=12)
_dot_string = st.lists(_atom, min_size=1, max_size=4).map(".".join)
_qcontent = st.one_of(
    st.sampled_from([chr(c) for c in range(32, 127) if c not in (34, 92)]),  # qtextSMTP
    st.sampled_from([chr(c) for c in range(32, 127)]).map(lambda c: "\\" + c),  # quoted-pairSMTP
)
_quoted_string = st.lists(_qcontent, max_size=15).map(lambda parts: '"' + "".join(parts) + '"')
_let_dig = st.sampled_from("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
_sub_domain = st.from_regex(r"[A-Za-z0-9]([A-Za-z0-9-]{0,20}[A-Za-z0-9])?", fullmatch=True)
_domain = st.lists(_sub_domain, min_size=1, max_size=4).map(".".join)
_ipv4_literal = st.ip_addresses(v=4).map(lambda a: f"[{a}]")
_ipv6_literal = st.tuples(st.sampled_from(["IPv6", "ipv6", "IPV6"]), st.ip_addresses(v=6)).map(
    lambda t: f"[{t[0]}:{t[1]}]")
_general_literal = st.tuples(
    st.from_regex(r"[A-Za-z0-9-]{0,8}[A-Za-z0-9]", fullmatch=True).filter(lambda tag: tag.lower() != "ipv6"),
    st.text(alphabet=[chr(c) for c in [*range(33, 91), *range(94, 127)]], min_size=1, max_size=20),
).map(lambda t: f"[{t[0]}:{t[1]}]")
_local_part = st.one_of(_dot_string, _quoted_string)
_mailbox_domain = st.one_of(_domain, _ipv4_literal, _ipv6_literal, _general_literal)
_route = st.lists(_domain.map(lambda d: "@" + d), max_size=3).map(lambda ds: ",".join(ds) + ":" if ds else "")
_param = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9-]{0,10}(=[\x21-\x3c\x3e-\x7e]{1,10})?", fullmatch=True)
_params = st.lists(_param, max_size=3).map(" ".join)


def _fits(local: str, domain: str, route: str) -> bool:
    return len(local) <= 64 and len(domain) <= 255 and len(route) + len(local) + len(domain) + 3 <= 256


@given(_local_part, _mailbox_domain, _route, _params)
def test_generated_paths_are_accepted_and_come_back_unchanged(local: str, domain: str, route: str,
                                                              params: str) -> None:
    if not _fits(local, domain, route):
        return
    mailbox = f"{local}@{domain}"
    text = f"<{route}{mailbox}>" + (f" {params}" if params else "")
    assert parse_path(text) == Path(mailbox, params, route[:-1])
    assert parse_path(text, smtputf8=True, postmaster=True) == Path(mailbox, params, route[:-1])


_SPECIALS = "()<>[]:;@\\,\" "
_CONTROLS = [chr(c) for c in [*range(0, 32), 127]]


@given(_dot_string, _domain, _route, st.data())
def test_mutated_paths_are_refused(local: str, domain: str, route: str, data: st.DataObject) -> None:
    """Each mutation of a valid path breaks one rule of the grammar: the result is always a refusal."""
    if not _fits(local, domain, route):
        return
    where = data.draw(st.integers(min_value=0, max_value=len(local)))
    mutations = [
        f"<{route}{local}@{domain}",  # no >
        f"{route}{local}@{domain}>",  # no <
        f"<<{route}{local}@{domain}>>",
        f"<{route}{local}@{domain}>" + data.draw(st.sampled_from("x=;,<>\t\x00")),  # garbage without SP
        f"<{route}{local[:where]}{data.draw(st.sampled_from(_SPECIALS))}{local[where:]}@{domain}>",
        f"<{route}{local[:where]}{data.draw(st.sampled_from(_CONTROLS))}{local[where:]}@{domain}>",
        f"<{route}.{local}@{domain}>",
        f"<{route}{local}.@{domain}>",
        f"<{route}{local}@.{domain}>",
        f"<{route}{local}@{domain}..>",
        f"<{route}{local}@{domain}-.x>",
        f"<{route}{'a' * (65 - len(local))}{local}@{domain}>",  # local part over 64
        f"<{route}{local}@>",
        f"<{route}@{domain}>",
    ]
    if "." in local:
        mutations.append(f"<{route}{local.replace('.', '..', 1)}@{domain}>")
    if "." in domain:
        mutations.append(f"<{route}{local}@{domain.replace('.', '..', 1)}>")
    for text in mutations:
        assert isinstance(parse_path(text, smtputf8=True, null=True), str), text
        assert isinstance(parse_path(text, postmaster=True), str), text


@given(_dot_string, _domain)
def test_eight_bit_in_a_generated_path_needs_smtputf8(local: str, domain: str) -> None:
    if not _fits(local + "é", domain, ""):
        return
    text = f"<{local}é@{domain}>"
    assert parse_path(text) == "8-bit address without SMTPUTF8"
    assert parse_path(text + " SMTPUTF8") == Path(f"{local}é@{domain}", "SMTPUTF8")
